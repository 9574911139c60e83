from serve_app.answers.grounding import StreamingCiter, build_prompt, cite
from serve_app.retrieval import StoredDocument

DOCS = [StoredDocument("d7", "Tides", "The moon pulls the oceans. " * 20),
        StoredDocument("d2", "", "Spring tides follow full and new moons."),
        StoredDocument("d9", "Waves", "Wind makes waves.")]


def test_prompt_numbers_the_passages_in_order_and_fits_the_limit():
    prompt = build_prompt("why are there tides?", DOCS, max_chars=400)
    assert prompt.user.startswith("Question: why are there tides?\n\nPassages:\n[1] Tides. The moon")
    assert "\n[2] Spring tides" in prompt.user and "\n[3] Waves. Wind makes waves." in prompt.user
    assert len(prompt.user) <= 400 and "…" in prompt.user  # the long passage was shortened
    assert prompt.passages == tuple(DOCS) and "square brackets" in prompt.system


def test_citations_map_to_doc_ids_and_unknown_passages_are_dropped_and_counted():
    cited = cite("The moon [1]. Both [2, 1] agree [3][9]; nothing else [0] .", DOCS)
    assert cited.text == "The moon [d7]. Both [d2][d7] agree [d9]; nothing else."
    assert cited.citations == ["d7", "d2", "d9"]
    assert cited.dropped == 2
    assert cite("No sources at all.", DOCS).citations == []


def test_a_marker_split_across_stream_deltas_is_held_until_it_closes():
    citer = StreamingCiter(DOCS)
    deltas = ["The moon ", "pulls [", "1", "] and [", "12] too", " [3", "]. Then [unclosed"]
    shown = [citer.add(delta) for delta in deltas]
    assert shown == ["The moon ", "pulls ", "", "[d7] and ", "too", " ", "[d9]. Then "]
    assert citer.finish().text == "[unclosed"  # never closed: no marker, shown as written
    assert citer.text() == "The moon pulls [d7] and too [d9]. Then [unclosed"
    assert citer.citations == ["d7", "d9"] and citer.dropped == 1
