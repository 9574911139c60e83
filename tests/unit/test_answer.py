from serve_app.answers.extractive import extractive_answer, snippet, split_sentences
from serve_app.retrieval import StoredDocument


def test_split_sentences_keeps_abbreviated_numbers_together():
    text = "Water boils at 100 C. It freezes at 0 C! Does it? yes."
    assert split_sentences(text) == ["Water boils at 100 C.", "It freezes at 0 C!", "Does it? yes."]


def test_snippet_picks_the_sentence_that_matches_the_query():
    text = "The sky is blue. Neural networks learn representations from data. Cats sleep a lot."
    assert snippet("how do neural networks learn", text) == "Neural networks learn representations from data."


def test_snippet_is_cut_at_a_word_boundary():
    text = "word " * 200
    cut = snippet("word", text, max_chars=50)
    assert len(cut) <= 50 and cut.endswith("…") and not cut[:-1].endswith(" ")


def test_answer_cites_each_sentence_it_uses():
    documents = [
        StoredDocument("d1", "", "Vaccines train the immune system. They are injected."),
        StoredDocument("d2", "", "Bread is baked in ovens."),
        StoredDocument("d3", "", "The immune system remembers pathogens."),
    ]
    answer = extractive_answer("how does the immune system learn", documents)
    assert answer.mode == "extractive"
    assert answer.citations == ["d1", "d3"]
    assert answer.text == "Vaccines train the immune system. [d1] The immune system remembers pathogens. [d3]"


def test_answer_without_overlap_still_cites_the_top_document():
    documents = [StoredDocument("d9", "", "Completely unrelated text. Second sentence.")]
    answer = extractive_answer("quantum chromodynamics", documents)
    assert answer.citations == ["d9"]
    assert answer.text.endswith("[d9]")
    assert extractive_answer("anything", []).citations == []
