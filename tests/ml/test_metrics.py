from __future__ import annotations

import pytest

from app.ml.generation_scores import example_scores, generation_report, sentence_score
from app.ml.scores import classification_report


def test_precision_recall_and_macro_f1_by_hand():
    gold = ["pos", "pos", "pos", "neg", "neg", "neu"]
    predicted = ["pos", "pos", "neg", "neg", "pos", "pos"]
    report = classification_report(gold, predicted, ["pos", "neg", "neu"])
    assert report["accuracy"] == pytest.approx(3 / 6)
    pos, neg, neu = (report["per_label"][label] for label in ("pos", "neg", "neu"))
    assert (pos["precision"], pos["recall"], pos["support"]) == (
        pytest.approx(2 / 4),
        pytest.approx(2 / 3),
        3,
    )
    assert (neg["precision"], neg["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))
    assert (neu["precision"], neu["recall"], neu["f1"]) == (0.0, 0.0, 0.0)  # never predicted
    f1_pos = 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3)
    assert report["macro_f1"] == pytest.approx((f1_pos + 0.5 + 0.0) / 3)


def test_a_label_absent_from_the_data_does_not_drag_the_macro_average():
    report = classification_report(["a", "a", "b"], ["a", "a", "b"], ["a", "b", "c"])
    assert report["macro_f1"] == 1.0 and report["per_label"]["c"]["support"] == 0


def test_the_confusion_matrix_has_a_row_per_true_label_in_the_labels_order():
    report = classification_report(
        ["pos", "pos", "neg", "neu"], ["pos", "neg", "neg", "pos"], ["neg", "pos", "neu"]
    )
    assert report["confusion_matrix"] == {
        "labels": ["neg", "pos", "neu"],
        "counts": [[1, 0, 0], [1, 1, 0], [0, 1, 0]],
    }


def test_generation_exact_match_and_f1_normalise_as_squad_does():
    # SQuAD's normalisation: lower case, no punctuation, no articles, white space folded.
    report = generation_report(["The  Eiffel tower!"], [["eiffel Tower"]])
    assert (report["exact_match"], report["f1"]) == (100.0, 100.0)
    half = generation_report(["eiffel"], [["eiffel tower"]])
    assert half["exact_match"] == 0.0
    assert half["f1"] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5, abs=1e-3)  # precision 1, recall 1/2


def test_an_example_counts_its_best_reference_however_many_the_others_have():
    predictions = ["the cat sat on the mat today", "paris is the capital city of france"]
    # The first example has one reference, the second two, and matches its second one word for word.
    references = [
        ["the cat sat on the mat today"],
        ["france has paris", "paris is the capital city of france"],
    ]
    report = generation_report(predictions, references)
    assert report["exact_match"] == 100.0 and report["rouge_l"] == pytest.approx(100.0)
    assert report["bleu"] == pytest.approx(100.0) and report["chrf"] == pytest.approx(100.0)
    assert report["signatures"]["bleu"].startswith("nrefs:var|")
    assert example_scores("france has paris", references[1])["exact_match"] == 100.0


def test_a_wrong_answer_scores_low_on_every_generation_metric():
    report = generation_report(["completely unrelated words here"], [["the cat sat on the mat today"]])
    assert report["exact_match"] == 0.0 and report["f1"] == 0.0
    assert report["bleu"] < 5 and report["chrf"] < 30 and report["rouge_l"] == 0.0


def test_generation_metrics_need_one_reference_list_per_prediction():
    with pytest.raises(ValueError, match="one list of references per prediction"):
        generation_report(["a", "b"], [["a"]])


def test_a_sentence_is_scored_alone_for_the_paired_test_of_a_hold_out():
    reference = ["Alimo serves pasta in the city centre."]
    assert sentence_score("Alimo serves pasta in the city centre.", reference, "bleu") == pytest.approx(100)
    # A short sentence sharing only bigrams still scores (effective order), below a full match.
    assert 0 < sentence_score("Alimo serves pasta.", reference, "bleu") < 100
    assert 0 < sentence_score("Alimo serves pasta.", reference, "chrf") < 100
    assert sentence_score("Bento", reference, "exact_match") == 0.0
    assert sentence_score("alimo serves pasta in the city centre", reference, "exact_match") == 100.0
    rouge = sentence_score("Alimo serves pasta.", reference, "rouge_l")
    assert rouge == pytest.approx(generation_report(["Alimo serves pasta."], [reference])["rouge_l"])
