"""Classification metrics over predicted and true labels, by scikit-learn's definitions: what a job's
hold-out and an evaluation report."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_report(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """accuracy, macro_f1, per_label precision, recall, F1 and support, and the confusion matrix (a row
    per true label, a column per predicted one, both in ``labels`` order). A label never predicted has
    precision 0; one absent from ``gold`` has recall 0 and is left out of the macro average, as it says
    nothing about this data."""
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=labels, zero_division=0.0
    )
    present = [label for label in labels if label in set(gold)]
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=present, average="macro", zero_division=0.0)),
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": {
            "labels": list(labels),
            "counts": confusion_matrix(gold, predicted, labels=labels).tolist(),
        },
    }
