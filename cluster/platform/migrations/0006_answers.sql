-- How each search was answered, and the user's rating of that answer (helpful 1 / not 0, or a
-- grade 0..4 scaled to [0, 1]), so the choice of answer mode can be learned.
ALTER TABLE experiences
    ADD COLUMN answer_mode text,
    ADD COLUMN answer_rating real,
    ADD COLUMN answer_rated_at timestamptz;
