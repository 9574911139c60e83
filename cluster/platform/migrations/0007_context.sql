-- The contextual policy: what a served search knew (its query, context features) and what its
-- actions cost (retrieval, and the answer mode when the policy chose it), and for feedback the
-- quality and cost behind each reward. Rows served before this migration have no context and
-- are not learned from.
ALTER TABLE experiences
    ADD COLUMN query          text,
    ADD COLUMN depth          smallint,
    ADD COLUMN context        real[],
    ADD COLUMN cost_cpu_ms    real,
    ADD COLUMN cost_wall_ms   real,
    ADD COLUMN quality        double precision,
    ADD COLUMN action_quality double precision[],
    ADD COLUMN action_costs   real[],
    ADD COLUMN next_context   real[],
    ADD COLUMN answer_action        smallint,
    ADD COLUMN answer_propensity    real,
    ADD COLUMN answer_probabilities real[],
    ADD COLUMN answer_cost_cpu_ms   real,
    ADD COLUMN answer_wall_ms       real,
    ADD COLUMN answer_reward        double precision;
