-- What every strategy would have served, so graded judgements can reward each of them, and the
-- behaviour policy's probability of each strategy (NULL for rows served before this migration).
ALTER TABLE experiences
    ADD COLUMN strategy_doc_ids jsonb,
    ADD COLUMN action_probabilities real[],
    ADD COLUMN action_rewards double precision[];
