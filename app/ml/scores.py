"""Classification metrics over predicted and true labels: what a version's evaluation reports."""

from __future__ import annotations


def classification_report(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """accuracy, macro_f1 (the unweighted mean of per-label F1) and per_label precision, recall, F1 and
    support. A label never predicted has precision 0; one absent from ``gold`` has recall 0 and is left
    out of the macro average, as it says nothing about this data."""
    per_label = {}
    for label in labels:
        hits = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        said = sum(p == label for p in predicted)
        support = sum(g == label for g in gold)
        precision = hits / said if said else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    present = [m["f1"] for m in per_label.values() if m["support"]]
    return {
        "accuracy": sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold),
        "macro_f1": sum(present) / len(present) if present else 0.0,
        "per_label": per_label,
    }
