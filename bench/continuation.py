"""Continuing a version on new data (init strategy "version") against a fresh job on all the data.

    .venv/bin/python bench/continuation.py        # SST-2, seeds 0 1 2: about 25 minutes on 2 cores

SST-2's training rows are shuffled once (seed 0); the first --rows (400) are what a team had, the next
--rows are what it gathered since. Per job seed:

- first: the default start on the first rows at the small budget (60 steps of 8), as bench/transfer.py's
  small budget; what it publishes is the version the team has;
- continued: a job on the new rows only, started from that version, at the same small budget;
- fresh, default length: one job on all 2 x --rows rows at the job's own length (100 steps of 32);
- fresh, same steps: one job on all the rows for as many steps of 8 as first and continued together.

Each job is the job a worker runs (its seeded hold-out, the start as the fallback, the bare-template rule);
a job that publishes nothing leaves the bare template, which is what is scored, and a continuation whose
first job published nothing starts from the default start instead (as a team would start afresh). The
first 200 SST-2 dev rows are read once per finished job, after training.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import DEFAULT_METHOD  # noqa: E402
from app.ml.trainer import Example  # noqa: E402
from bench.transfer import BUDGETS, TASKS, Task, examples, fresh_start, scored_job  # noqa: E402
from bench.tuning import load, log  # noqa: E402


def one_seed(backbone, task: Task, first: list[Example], new: list[Example], test: list[Example], seed: int):
    """The four jobs of one seed: {job: dev accuracy}."""
    start = fresh_start(backbone, DEFAULT_METHOD, labels=list(task.labels), seed=seed)
    small = BUDGETS["small"]
    steps, batch = small["steps"], small["batch_size"]
    scores = {}

    def job(name: str, rows: list[Example], begin: torch.Tensor, given: dict) -> torch.Tensor | None:
        label = f"{name} seed {seed}"
        scored = scored_job(backbone, task, rows, begin, test, given=given, seed=seed, label=label)
        scores[name] = scored.test
        return scored.prompt

    version = job(f"first ({len(first)} rows, {steps} steps of {batch})", first, start, small)
    from_version = start if version is None else version.detach()
    job(f"continued ({len(new)} new rows, {steps} steps of {batch})", new, from_version, small)
    job(f"fresh ({len(first + new)} rows, default length)", first + new, start, {})
    job(
        f"fresh ({len(first + new)} rows, {2 * steps} steps of {batch})",
        first + new,
        start,
        {**small, "steps": 2 * steps},
    )
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=400, help="rows of the first job, and new rows after")
    parser.add_argument("--test-rows", type=int, default=200)
    args = parser.parse_args()

    task = TASKS["sst2"]
    pool = examples(task, "train")
    random.Random(0).shuffle(pool)
    first, new = pool[: args.rows], pool[args.rows : 2 * args.rows]
    test = examples(task, task.test_file)[: args.test_rows]
    backbone = load()
    runs: dict[str, list[float]] = {}
    for seed in args.seeds:
        for name, score in one_seed(backbone, task, first, new, test, seed).items():
            runs.setdefault(name, []).append(score)

    log("\n| job | dev[:200] accuracy per seed | mean |")
    log("| --- | --- | --- |")
    for name, scores in runs.items():
        log(f"| {name} | {', '.join(f'{s:.3f}' for s in scores)} | {statistics.mean(scores):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
