-- Whether the BM25 statistics (lexeme_stats, corpus_stats) lag the documents. Each ingested
-- batch sets `dirty` in its own transaction; a refresh clears it in the transaction that
-- refreshes, so an interrupted ingestion leaves it set and the next one refreshes. Starts
-- dirty: a database ingested before this migration may hold stale statistics.
CREATE TABLE statistics_state (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    dirty        boolean NOT NULL,
    refreshed_at timestamptz
);
INSERT INTO statistics_state (dirty) VALUES (true);
