"""Calibrating label priors after a classification job, judged on held-out training rows, never on dev.

    .venv/bin/python bench/calibration.py     # the default job on 400 SST-2 rows, seeds 0 1 2: 4 minutes

A small model's rank classification can lean towards one label; calibration subtracts a per-label log
prior from the label scores before the argmax. Estimates of that prior, each from what a job has:

- train: the mean predicted label distribution over the job's training rows, over their label frequencies;
- hold-out: the same over the job's hold-out rows;
- content-free: the mean prediction for inputs that carry no content ("N/A", "", "[MASK]"; Zhao et al.,
  2021, "Calibrate before use");
- own prior: the scored rows' own mean prediction, which no job can know in advance: how far a prior
  correction could go at best.

Per job seed, the default job (bench/transfer.py's small budget: 60 steps of 8 on 400 sampled rows, its
seeded hold-out; the bare template when it would publish nothing) and the bare template are scored on 500
other training rows of 12 words or more (as bench/defaults.py scores), raw and under each estimate;
printed with the share of rows called positive.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import DEFAULT_METHOD  # noqa: E402
from app.ml.backbone import Backbone  # noqa: E402
from app.ml.inference import label_log_likelihoods  # noqa: E402
from app.ml.text import render  # noqa: E402
from app.ml.trainer import Example  # noqa: E402
from app.services.tuning.training import split_holdout  # noqa: E402
from bench.transfer import BUDGETS, TASKS, fresh_start, target_job  # noqa: E402
from bench.tuning import LABELS, TEMPLATE, load, log, rows  # noqa: E402

CONTENT_FREE = ["N/A", "", "[MASK]"]


def scores(backbone: Backbone, prompt: torch.Tensor | None, texts: list[str]) -> torch.Tensor:
    """Label log-likelihoods [rows, labels] under the SST-2 template (scored in chunks of tokens inside)."""
    rendered = [render(TEMPLATE, text) for text in texts]
    return label_log_likelihoods(backbone, prompts=[prompt] * len(texts), texts=rendered, labels=LABELS)


def prior(label_scores: torch.Tensor) -> torch.Tensor:
    """log of the mean predicted label distribution."""
    return label_scores.softmax(-1).mean(0).log()


def log_frequencies(examples: list[Example]) -> torch.Tensor:
    return torch.tensor(
        [sum(ex.output == label for ex in examples) / len(examples) for label in LABELS]
    ).log()


def report(
    name: str, backbone: Backbone, prompt, kept: list[Example], held: list[Example], scored: list[Example]
):
    on_scored = scores(backbone, prompt, [ex.input for ex in scored])
    gold = torch.tensor([LABELS.index(ex.output) for ex in scored])
    frequencies = log_frequencies(kept)
    offsets = {
        "raw": torch.zeros(len(LABELS)),
        "train": prior(scores(backbone, prompt, [ex.input for ex in kept])) - frequencies,
        "hold-out": prior(scores(backbone, prompt, [ex.input for ex in held])) - frequencies,
        "content-free": prior(scores(backbone, prompt, CONTENT_FREE)),
        "own prior": prior(on_scored),
    }
    shown = []
    for estimate, offset in offsets.items():
        predicted = (on_scored - offset).argmax(-1)
        correct = (predicted == gold).float().mean().item()
        positive = (predicted == LABELS.index("positive")).float().mean().item()
        shown.append(f"{estimate} {correct:.3f} ({positive:.2f} positive)")
    log(f"{name}: " + " | ".join(shown))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--held-out-rows", type=int, default=500)
    args = parser.parse_args()

    pool = rows("train")
    random.Random(0).shuffle(pool)
    sample = pool[: args.train_rows]
    scored = [ex for ex in pool[args.train_rows :] if len(ex.input.split()) >= 12][: args.held_out_rows]
    backbone = load()
    log(f"{len(scored)} held-out training rows, {sum(ex.output == 'positive' for ex in scored)} positive")
    kept, held = split_holdout(sample, seed=0)
    report("bare template", backbone, None, kept, held, scored)
    sst2 = TASKS["sst2"]
    for seed in args.seeds:
        start = fresh_start(backbone, DEFAULT_METHOD, labels=LABELS, seed=seed)
        prompt, _ = target_job(backbone, sst2, sample, start, given=BUDGETS["small"], seed=seed)
        kept, held = split_holdout(sample, seed=seed)  # the rows that job trained on and held out
        report(f"job seed {seed}", backbone, prompt, kept, held, scored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
