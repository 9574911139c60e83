import numpy as np
import pytest

from learners.context import FEATURES, lexical_context

SCORE_SHAPE = ("top_score", "top_gap", "tenth_ratio", "wig", "nqc")  # the features read off the BM25 list
SCORES = [12.0, 9.5, 9.0, 7.25, 6.0, 5.5, 5.0, 4.0, 3.5, 3.0, 2.0, 1.5]
IDF = [2.5, 4.0, 1.5]


def feature(context: np.ndarray, name: str) -> float:
    return float(context[FEATURES.index(name)])


def test_one_value_per_named_feature():
    context = lexical_context("what is the capital of France?", SCORES, IDF, depth=20)
    assert context.shape == (len(FEATURES),) and len(set(FEATURES)) == len(FEATURES)
    assert np.isfinite(context).all()


def test_deterministic():
    first = lexical_context("covid 19 vaccine trials", SCORES, IDF, depth=20)
    np.testing.assert_array_equal(lexical_context("covid 19 vaccine trials", list(SCORES), list(IDF), depth=20), first)


def test_score_features_match_their_definitions():
    s, idf = np.array(SCORES), np.array(IDF)
    context = lexical_context("capital of france", SCORES, IDF, depth=20)
    expected = {
        "query_words": np.log1p(3), "matched_terms": np.log1p(3),
        "idf_max": 4.0, "idf_mean": idf.mean(), "idf_min": 1.5, "hit_share": 12 / 20,
        "top_score": 12.0 / 8.0, "top_gap": 2.5 / 12.0, "tenth_ratio": 3.0 / 12.0,
        "wig": (s[:5].mean() - s.mean()) / 12.0, "nqc": s.std() / s.mean(),
    }
    for name, value in expected.items():
        assert feature(context, name) == pytest.approx(value), name


@pytest.mark.parametrize("factor", [0.01, 7.0, 1e4])
def test_score_shape_features_are_scale_free(factor):
    base = lexical_context("capital of france", SCORES, IDF, depth=20)
    scaled = lexical_context("capital of france", np.array(SCORES) * factor, np.array(IDF) * factor, depth=20)
    for name in SCORE_SHAPE:
        assert feature(scaled, name) == pytest.approx(feature(base, name), rel=1e-12), name
    assert feature(scaled, "idf_max") == pytest.approx(factor * feature(base, "idf_max"))  # not every feature is


@pytest.mark.parametrize(("scores", "idf"), [([], []), ([], [3.0, 1.0]), ([0.0, 0.0], [2.0])])
def test_no_lexical_hits_give_finite_zeros_for_the_score_features(scores, idf):
    context = lexical_context("zzyzx qwrtp", scores, idf, depth=20)
    assert np.isfinite(context).all()
    for name in SCORE_SHAPE:
        assert feature(context, name) == 0.0, name
    assert feature(context, "hit_share") == len(scores) / 20


def test_a_single_hit_has_a_full_gap_and_no_spread():
    context = lexical_context("rare term", [5.0], [5.0], depth=10)
    assert (feature(context, "top_score"), feature(context, "top_gap"), feature(context, "tenth_ratio"),
            feature(context, "wig"), feature(context, "nqc")) == pytest.approx((1.0, 1.0, 0.0, 0.0, 0.0))


@pytest.mark.parametrize(("query", "question", "statement", "digits"), [
    ("What is the capital of France", 1.0, 0.0, 0.0),
    ("capital of france?", 1.0, 0.0, 0.0),
    ("the capital of france is paris", 0.0, 1.0, 0.0),
    ("covid 19 vaccine", 0.0, 0.0, 1.0),
    ("python asyncio", 0.0, 0.0, 0.0),
])
def test_question_statement_and_digit_flags(query, question, statement, digits):
    context = lexical_context(query, SCORES, IDF, depth=20)
    assert (feature(context, "question"), feature(context, "statement"), feature(context, "digits")) == (
        question, statement, digits)
