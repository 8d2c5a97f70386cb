"""Generation metrics of predicted texts against one or more references each, from the libraries people
report them with: exact match and token F1 with SQuAD's normalisation (torchmetrics), BLEU and chrF
(sacrebleu, its signature kept so a figure can be compared), ROUGE-L (rouge-score, stemmed).

Every figure is on sacrebleu's 0-100 scale; over several references an example counts its best one
(SQuAD, ROUGE) or all of them (BLEU and chrF, as multi-reference corpus scores)."""

from __future__ import annotations

from itertools import zip_longest

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from torchmetrics.functional.text import squad

_ROUGE = RougeScorer(["rougeL"], use_stemmer=True)


def generation_report(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus figures: exact_match, f1, bleu, chrf, rouge_l, and the sacrebleu signatures."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    # sacrebleu takes reference streams (the i-th reference of every example); an example with fewer
    # references than another has None in the streams it lacks, which sacrebleu skips.
    streams = [list(stream) for stream in zip_longest(*references)]
    bleu, chrf = BLEU(), CHRF()
    squad_scores = squad(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)],
        [
            {"answers": {"text": refs, "answer_start": [0] * len(refs)}, "id": str(i)}
            for i, refs in enumerate(references)
        ],
    )
    rouge = [example_rouge_l(p, refs) for p, refs in zip(predictions, references, strict=True)]
    return {
        "exact_match": float(squad_scores["exact_match"]),
        "f1": float(squad_scores["f1"]),
        "bleu": bleu.corpus_score(predictions, streams).score,
        "chrf": chrf.corpus_score(predictions, streams).score,
        "rouge_l": sum(rouge) / len(rouge),
        "signatures": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
    }


def example_scores(prediction: str, references: list[str]) -> dict:
    """One example's exact_match, f1 and rouge_l against its best reference (for the predictions file)."""
    one = squad(
        {"prediction_text": prediction, "id": "0"},
        {"answers": {"text": references, "answer_start": [0] * len(references)}, "id": "0"},
    )
    return {
        "exact_match": float(one["exact_match"]),
        "f1": float(one["f1"]),
        "rouge_l": example_rouge_l(prediction, references),
    }


def example_rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure against the best of ``references``, 0-100."""
    return 100 * _ROUGE.score_multi(references, prediction)["rougeL"].fmeasure


def sentence_score(prediction: str, references: list[str], metric: str) -> float:
    """One example's score by one metric (0-100), for the paired test of a job's hold-out rows: SQuAD's
    exact match and F1 and ROUGE-L against its best reference, sacrebleu's sentence BLEU (with effective
    order, so a short sentence is not 0 for lacking 4-grams) and sentence chrF."""
    if metric == "bleu":
        return BLEU(effective_order=True).sentence_score(prediction, references).score
    if metric == "chrf":
        return CHRF().sentence_score(prediction, references).score
    if metric == "rouge_l":
        return example_rouge_l(prediction, references)
    return example_scores(prediction, references)[metric]
