-- The BM25 shape the postings' impacts were computed with: k1, b and the collection's average
-- document length. A statistics refresh compares it with the configured k1 and b and the
-- refreshed average, and recomputes every impact when they differ (the average by more than
-- a tenth), so each term's postings stay in the order of their BM25 weight as the collection
-- grows. Unknown here (the impacts so far mix the shapes of earlier ingestions): the next
-- refresh recomputes them.
ALTER TABLE statistics_state
    ADD COLUMN impact_k1 double precision,
    ADD COLUMN impact_b double precision,
    ADD COLUMN impact_avg_doc_len double precision;
