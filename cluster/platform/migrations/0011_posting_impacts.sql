-- Impact-ordered postings, so lexical search can read a bounded number of postings per query term
-- (the highest BM25 term weights first) instead of every posting of every term. `impact` is the
-- BM25 term-frequency part, tf (k1 + 1) / (tf + k1 (1 - b + b doc_len / avg_doc_len)), computed at
-- ingestion with the configured k1, b and the collection's average length at the time: it only
-- orders postings; scores are always recomputed exactly from tf and doc_len at query time.
ALTER TABLE postings ADD COLUMN impact real;

-- Existing postings get the impact under the default k1 = 0.9, b = 0.4 (configs/settings.yaml).
UPDATE postings p
SET impact = p.tf * 1.9 / (p.tf + 0.9 * (0.6 + 0.4 * p.doc_len / greatest(s.avg_doc_len, 1e-9)))
FROM corpus_stats s;

ALTER TABLE postings ALTER COLUMN impact SET NOT NULL;

-- doc_id as the last key column: ties (many postings share tf and length) cut deterministically;
-- tf and doc_len included, so reading a term's top postings is an index-only scan.
CREATE INDEX postings_impact_idx ON postings (lexeme, impact DESC, doc_id) INCLUDE (tf, doc_len);
