-- Documents with a full-text vector and a 384-dim MiniLM embedding, plus the postings and
-- statistics that BM25 ranking needs (PostgreSQL's ts_rank has no inverse document frequency).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE documents (
    id             text PRIMARY KEY,
    title          text NOT NULL DEFAULT '',
    text           text NOT NULL,
    content_sha256 text NOT NULL,
    tsv            tsvector GENERATED ALWAYS AS (to_tsvector('english', title || ' ' || text)) STORED,
    doc_len        integer NOT NULL DEFAULT 0,
    embedding      vector(384) NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX documents_tsv_idx ON documents USING gin (tsv);
CREATE INDEX documents_embedding_idx ON documents USING hnsw (embedding vector_cosine_ops);

-- One row per (lexeme, document): term frequency and document length, read by index-only scans.
CREATE TABLE postings (
    lexeme  text NOT NULL,
    doc_id  text NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    tf      integer NOT NULL,
    doc_len integer NOT NULL,
    PRIMARY KEY (lexeme, doc_id) INCLUDE (tf, doc_len)
);
CREATE INDEX postings_doc_id_idx ON postings (doc_id);

-- Refreshed (concurrently, so readers never block) at the end of each ingestion.
CREATE MATERIALIZED VIEW lexeme_stats AS
    SELECT lexeme, count(*)::integer AS df FROM postings GROUP BY lexeme;
CREATE UNIQUE INDEX lexeme_stats_lexeme_idx ON lexeme_stats (lexeme) INCLUDE (df);

CREATE MATERIALIZED VIEW corpus_stats AS
    SELECT 1 AS singleton,
           count(*)::bigint AS n_docs,
           coalesce(avg(doc_len), 0)::double precision AS avg_doc_len
    FROM documents;
CREATE UNIQUE INDEX corpus_stats_singleton_idx ON corpus_stats (singleton);
