"""Choosing a tuning method's defaults on held-out training rows, never on dev.

    .venv/bin/python bench/defaults.py --method prefix --rates 0.003 0.01 0.03 --inits labels random

Each candidate (method, initialisation, learning rate) trains on a seeded sample of SST-2 training rows
with a job's other defaults at the given length, and is scored by rank classification on other training
rows that no candidate trains on; the bare template's score on those rows is printed beside. The dev split
is not read.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ml.method import INITS, Method  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt  # noqa: E402
from app.ml.trainer import train_prompt  # noqa: E402
from bench.tuning import LABELS, TEMPLATE, VIRTUAL_TOKENS, accuracy, config, load, log, rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=list(Method), default=Method.PREFIX)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.003, 0.01, 0.03])
    parser.add_argument("--inits", nargs="+", default=["labels"])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--held-out-rows", type=int, default=500)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="which training rows are sampled")
    args = parser.parse_args()
    method = Method(args.method)
    unknown = set(args.inits) - set(INITS[method])
    if unknown:
        parser.error(f"{method} cannot start from {sorted(unknown)}; one of {INITS[method]}")

    pool = rows("train")
    random.Random(args.seed).shuffle(pool)
    train = pool[: args.train_rows]
    held_out = pool[args.train_rows : args.train_rows + args.held_out_rows]
    backbone = load()
    log(
        f"{method}: {args.train_rows} sampled SST-2 training rows (seed {args.seed}), {args.steps} steps of "
        f"{args.batch_size}, {VIRTUAL_TOKENS} virtual tokens; scored on {len(held_out)} other training rows"
    )
    log(f"bare template on the held-out rows: {accuracy(backbone, None, held_out):.3f}")
    start = init_prefix if method == Method.PREFIX else init_prompt
    for init in args.inits:
        for rate in args.rates:
            began = time.perf_counter()
            result = train_prompt(
                backbone,
                prompt=start(
                    backbone, num_virtual_tokens=VIRTUAL_TOKENS, strategy=init, labels=LABELS, seed=args.seed
                ),
                train=train,
                validation=[],
                template=TEMPLATE,
                labels=LABELS,
                config=config(args.steps, args.batch_size, learning_rate=rate),
                on_progress=lambda _: None,
                should_stop=lambda: False,
            )
            seconds = time.perf_counter() - began
            log(
                f"  init {init:>6}, learning rate {rate:<6}: held-out accuracy "
                f"{accuracy(backbone, result.prompt, held_out):.3f}  ({seconds:.0f} s of training)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
