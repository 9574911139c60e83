-- Retention (cluster.data.retention) walks experiences by creation time, and keeps the newest
-- rated answers that the learning actor replays after a restart.
CREATE INDEX experiences_created_at_idx ON experiences (created_at, search_id);
CREATE INDEX experiences_answer_rated_at_idx ON experiences (answer_rated_at) WHERE answer_rated_at IS NOT NULL;
