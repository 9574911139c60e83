import dataclasses
import statistics

import pytest

from cluster.core.vocabulary import STRATEGIES, FeatureFlags, Strategy
from learners.context import FEATURES
from cluster.data.beir import load_qrels, load_queries
from cluster.data.corpus import sample_corpus_dir
from learners.ranking_metrics import ndcg_at_k
from serve_app.answers.from_settings import composer_from_settings
from serve_app.pipeline import ArmConfig, SearchPipeline
from serve_app.stages import Cost
from serve_app.schemas import RankRequest, SearchRequest
from serve_app.retrieval import DocumentIndex

pytestmark = pytest.mark.integration
CONFIG = ArmConfig(version=3, flags=FeatureFlags())


@pytest.fixture
async def pipeline(pool, embedder, live_settings):
    retrieval = live_settings.retrieval
    index = DocumentIndex.configured(pool, retrieval)  # as the service runs it: bounded BM25

    async def embed_query(query: str):
        vectors, cpu_ms = embedder.encode_with_cpu([query])
        return vectors[0], cpu_ms

    return SearchPipeline(index, embed_query, retrieval, composer_from_settings(live_settings), "test")


async def rank(pipeline: SearchPipeline, query: str, strategy: Strategy, depth: int) -> list[tuple[str, float]]:
    response = await pipeline.ranked(RankRequest(q=query, depth=depth, strategy=strategy), CONFIG)
    return [(r.doc_id, r.score) for r in response.ranking]


async def test_lexical_ranks_by_bm25_and_backfills_from_dense(pipeline):
    ranking = await rank(pipeline, "photosynthesis chlorophyll", Strategy.LEXICAL, 10)
    scores = [s for _, s in ranking]
    assert len(ranking) == 10 and scores == sorted(scores, reverse=True) and scores[0] > 0
    unmatched = await rank(pipeline, "zzzxqv qqqwv", Strategy.LEXICAL, 10)
    dense = await rank(pipeline, "zzzxqv qqqwv", Strategy.DENSE, 10)
    assert [d for d, _ in unmatched] == [d for d, _ in dense] and {s for _, s in unmatched} == {0.0}


async def test_dense_finds_a_paraphrase_with_no_shared_words(pipeline):
    ranking = await rank(pipeline, "powerhouse of the cell", Strategy.DENSE, 5)
    assert len(ranking) == 5
    assert all(-1.0 <= s <= 1.0 for _, s in ranking)


@pytest.mark.parametrize("depth", [1, 7, 50, 160])
async def test_every_strategy_honours_depth(pipeline, depth):
    for strategy in STRATEGIES:
        ranking = await rank(pipeline, "how do vaccines protect people", strategy, depth)
        assert len(ranking) == depth
        assert len({d for d, _ in ranking}) == len(ranking)


async def test_search_returns_hits_answer_and_metadata(pipeline, pool):
    response = await pipeline.search(SearchRequest(q="machine learning", final_topk=5), None, CONFIG)
    assert len(response.hits) == 5 and response.config_version == 3
    assert [h.rank for h in response.hits] == [1, 2, 3, 4, 5]
    assert response.strategy == "hybrid@0.5" and response.arm == "test"  # the default: complete-score fusion
    assert response.answer.mode == "extractive" and response.answer.fallback is None  # no provider: asked for
    assert set(response.answer.citations) <= {h.doc_id for h in response.hits}
    assert all(f"[{c}]" in response.answer.text for c in response.answer.citations)
    texts = dict(await pool.fetch("SELECT id, text FROM documents WHERE id = ANY($1::text[])",
                                  [h.doc_id for h in response.hits]))
    for hit in response.hits:
        assert hit.snippet and hit.snippet.removesuffix("…") in texts[hit.doc_id]


async def test_quality_on_the_sample_collection(pipeline):
    dataset = sample_corpus_dir()
    qrels = load_qrels(dataset / "qrels" / "test.tsv")
    queries = load_queries(dataset)
    means = {}
    for strategy in STRATEGIES:
        scores = []
        for qid, judged in qrels.items():
            ranking = await rank(pipeline, queries[qid], strategy, 10)
            scores.append(ndcg_at_k([d for d, _ in ranking], judged, 10))
        means[strategy] = statistics.fmean(scores)
    assert min(means.values()) >= 0.6, means
    assert means["hybrid_rrf"] >= min(means["lexical"], means["dense"]), means
    assert means["hybrid_complete"] >= min(means["lexical"], means["dense"]), means


async def test_every_action_ranks_to_depth_and_costs_what_it_ran(pipeline):
    context, outcomes = await pipeline.every_action("how do vaccines protect people", 10)
    assert len(context) == len(FEATURES) and len(outcomes) == len(pipeline.actions) == 7
    assert all(len(ids) == 10 and len(set(ids)) == 10 for ids, _ in outcomes)
    costs = {action.name: cost for action, (_, cost) in zip(pipeline.actions, outcomes, strict=True)}
    assert costs["lexical"] == Cost()  # enough BM25 matches: nothing runs after the lexical stage
    # which stages each action shares and pays for: tests/unit/test_stages.py
    assert all(costs[name].cpu_ms > 0 for name in costs if name != "lexical")


async def test_lexical_action_backfills_a_short_list_from_dense_and_pays_for_it(pipeline):
    _, outcomes = await pipeline.every_action("zzzxqv qqqwv", 5)  # no term in the corpus
    ids, cost = outcomes[0]
    assert len(ids) == 5 and cost.cpu_ms > 0


async def test_complete_scores_rank_a_one_sided_candidate_by_its_real_score(pipeline):
    """hybrid_complete differs from the partial-list fusion it replaces exactly by those candidates."""
    query = "how do vaccines protect people"
    complete = await rank(pipeline, query, Strategy.HYBRID_COMPLETE, 20)
    partial = await rank(pipeline, query, Strategy.HYBRID_WEIGHTED, 20)
    assert complete != partial and len(complete) == len(partial) == 20


async def test_lexical_ranking_carries_the_idf_of_each_query_term_the_corpus_has(pool, live_settings):
    retrieval = live_settings.retrieval
    index = DocumentIndex(pool, bm25_k1=retrieval.bm25_k1, bm25_b=retrieval.bm25_b, ef_search=retrieval.ef_search)
    ranking, idf = await index.lexical_with_idf("photosynthesis chlorophyll zzqxjv", 5)
    expected = await pool.fetch(
        """SELECT ln(1 + (s.n_docs - l.df + 0.5) / (l.df + 0.5)) AS idf
           FROM unnest(to_tsvector('english', 'photosynthesis chlorophyll zzqxjv')) u
           JOIN lexeme_stats l ON l.lexeme = u.lexeme CROSS JOIN corpus_stats s""")
    assert ranking and len(expected) == 2  # the made-up term is not in the corpus
    assert sorted(idf) == pytest.approx(sorted(float(row["idf"]) for row in expected))
    assert await index.lexical_with_idf("zzqxjv", 5) == ([], [])


def index_with_cutoff(pool, live_settings, cutoff: int) -> DocumentIndex:
    return DocumentIndex.configured(pool, dataclasses.replace(live_settings.retrieval,
                                                              lexical_postings_per_term=cutoff))


async def test_bounded_lexical_equals_exhaustive_when_no_list_is_cut(pool, live_settings):
    exhaustive = index_with_cutoff(pool, live_settings, 0)
    bounded = index_with_cutoff(pool, live_settings, await pool.fetchval("SELECT count(*) FROM postings"))
    for query in load_queries(sample_corpus_dir()).values():
        expected, expected_idf = await exhaustive.lexical_with_idf(query, 20)
        result = await bounded.lexical_bounded(query, 20)
        assert result.exact and result.rescored == 0
        assert [d for d, _ in result.ranking] == [d for d, _ in expected], query
        assert [s for _, s in result.ranking] == pytest.approx([s for _, s in expected])
        assert sorted(result.idf) == pytest.approx(sorted(expected_idf))


async def test_bounded_lexical_scores_exactly_and_is_exact_where_proven(pool, live_settings):
    """With two postings per term, lists are cut: scores stay exact BM25, and when the thresholds
    prove it the top k is exhaustive BM25's."""
    exhaustive = index_with_cutoff(pool, live_settings, 0)
    bounded = index_with_cutoff(pool, live_settings, 2)
    queries = load_queries(sample_corpus_dir()).values()
    proven = rescored = 0
    for query in queries:
        result = await bounded.lexical_bounded(query, 3)
        exact_scores = await exhaustive.lexical_scores(query, [d for d, _ in result.ranking])
        assert dict(result.ranking) == pytest.approx(exact_scores), query
        assert [s for _, s in result.ranking] == sorted((s for _, s in result.ranking), reverse=True)
        if result.exact:
            proven += 1
            expected, _ = await exhaustive.lexical_with_idf(query, 3)
            assert [d for d, _ in result.ranking] == [d for d, _ in expected], query
        rescored += result.rescored
    assert 0 < proven < len(queries) and rescored  # both cases met, and some lists were cut


@pytest.mark.parametrize("term", ["learning", "network", "cell", "data"])
async def test_bounded_lexical_keeps_a_terms_highest_weighted_documents(pool, live_settings, term):
    """One term: its top postings by impact are its top documents by BM25, even with the list cut."""
    exhaustive = index_with_cutoff(pool, live_settings, 0)
    bounded = index_with_cutoff(pool, live_settings, 3)
    postings = await pool.fetchval("""SELECT count(*) FROM postings
                                      WHERE lexeme = (SELECT lexeme FROM unnest(to_tsvector('english', $1)))""", term)
    assert postings > 3  # the list is cut
    expected, _ = await exhaustive.lexical_with_idf(term, 3)
    ranking, _ = await bounded.lexical_with_idf(term, 3)
    assert [d for d, _ in ranking] == [d for d, _ in expected]


async def test_impacts_order_each_terms_postings_by_their_bm25_weight(pool, live_settings):
    retrieval = live_settings.retrieval
    out_of_order = await pool.fetchval(
        """SELECT count(*) FROM (
               SELECT weight, lag(weight) OVER (PARTITION BY lexeme ORDER BY impact DESC, doc_id) AS previous
               FROM (SELECT p.lexeme, p.doc_id, p.impact,
                            p.tf * ($1 + 1) / (p.tf + $1 * (1 - $2 + $2 * p.doc_len / s.avg_doc_len)) AS weight
                     FROM postings p CROSS JOIN corpus_stats s) weights) ordered
           WHERE weight > previous + 1e-6""", retrieval.bm25_k1, retrieval.bm25_b)
    assert out_of_order == 0
