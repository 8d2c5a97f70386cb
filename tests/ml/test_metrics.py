from __future__ import annotations

import pytest

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
