"""The default job on a few hundred labelled rows, as a worker runs it, over several seeds.

    .venv/bin/python bench/small_data.py --methods prompt prefix --seeds 0 1 2   # about 10 minutes on 2 cores
    .venv/bin/python bench/small_data.py --methods prefix --default-length      # the job's own length

One seeded sample of SST-2 training rows (400 by default); for each method and job seed, a job that gives
only its length (60 steps of 8; with --default-length, not even that) and otherwise takes every default:
its seeded hold-out, label-word init, the method's learning rate and length, warm-up and decay, the
start as the fallback and the rule that a version must not score below the bare template on the
hold-out beyond its noise (app/ml/versus_bare.py).
Printed per run: the hold-out scores (tuned, bare) and the accuracy on the first 200 SST-2 dev rows, read
once at the end; then each method's mean over the seeds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import METHOD_DEFAULTS, Hyperparameters  # noqa: E402
from app.contract.kinds import Method  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt  # noqa: E402
from app.ml.trainer import TrainConfig, train_prompt  # noqa: E402
from app.services.tuning.training import split_holdout  # noqa: E402
from bench.tuning import LABELS, TEMPLATE, accuracy, load, log, rows  # noqa: E402

TARGET = 0.84  # mean dev[:200] accuracy of the default job over the seeds (zero-shot 0.790)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=list(Method), default=list(Method))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--sample-seed", type=int, default=0, help="which training rows are sampled")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the job's")
    parser.add_argument(
        "--default-length",
        action="store_true",
        help="the job's own steps and batch, not --steps and --batch-size",
    )
    parser.add_argument("--dev-rows", type=int, default=200)
    args = parser.parse_args()

    pool = rows("train")
    random.Random(args.sample_seed).shuffle(pool)
    sample = pool[: args.train_rows]
    backbone = load()
    given = {} if args.default_length else {"steps": args.steps, "batch_size": args.batch_size}
    given |= {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
    log(
        f"{args.train_rows} sampled SST-2 training rows (sample seed {args.sample_seed}); a default job "
        f"with {given}; dev accuracy on the first {args.dev_rows} dev rows, read after training"
    )
    results: dict[str, list[float]] = {}
    dev = None
    for method in map(Method, args.methods):
        start = init_prefix if method == Method.PREFIX else init_prompt
        for seed in args.seeds:
            hp = Hyperparameters(**given, seed=seed)
            kept, held = split_holdout(sample, seed=seed)
            hp = hp.resolve(len(kept), max_steps=10_000, method=method, classification=True)
            log(f"  {method:>6} seed {seed}: {hp.steps} steps of {hp.batch_size}")
            began = time.perf_counter()
            result = train_prompt(
                backbone,
                prompt=start(
                    backbone,
                    num_virtual_tokens=METHOD_DEFAULTS[method].num_virtual_tokens,
                    strategy="labels",
                    labels=LABELS,
                    seed=seed,
                ),
                train=kept,
                validation=held,
                template=TEMPLATE,
                labels=LABELS,
                config=TrainConfig.of(hp, classification=True),
                on_progress=lambda _: None,
                should_stop=lambda: False,
            )
            seconds = time.perf_counter() - began
            metrics = result.metrics
            published = result.versus_bare is None or not result.versus_bare.worse
            dev = dev or rows("dev")[: args.dev_rows]
            # A job that would publish nothing leaves the user with the bare template.
            scored = accuracy(backbone, result.prompt if published else None, dev)
            results.setdefault(method, []).append(scored)
            log(
                f"  {method:>6} seed {seed}: hold-out ({len(held)} rows) {metrics['val_accuracy']:.3f} "
                f"(bare {metrics['zero_shot_accuracy']:.3f}, kept step {metrics['best_step']}), "
                f"{'published' if published else 'NOT published (below the bare template)'}; "
                f"dev {scored:.3f}; {seconds:.0f} s"
            )
    for method, scores in results.items():
        log(
            f"{method:>6}: mean dev accuracy {statistics.mean(scores):.3f} over seeds {args.seeds} "
            f"(target >= {TARGET})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
