"""Choosing a tuning method's defaults on held-out training rows, never on dev.

    .venv/bin/python bench/defaults.py --method prefix --rates 0.01 0.03 --tokens 10 20 --seeds 0 1

Each candidate (method, initialisation, length, learning rate, loss) trains on a seeded sample of SST-2
training rows with a job's other defaults at the given length, once per training seed, and is scored by
rank classification on other training rows that no candidate trains on: by default rows of 12 words or
more, since SST-2's training split is mostly short phrases and its dev split whole sentences (median 7
words against 19). The bare template's score on those rows is printed beside. The dev split is not read.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import METHOD_DEFAULTS, Loss  # noqa: E402
from app.contract.kinds import INITS, Method  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt  # noqa: E402
from app.ml.trainer import train_prompt  # noqa: E402
from bench.tuning import LABELS, TEMPLATE, accuracy, config, load, log, rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=list(Method), default=Method.PREFIX)
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="default: the method's")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="default: the method's")
    parser.add_argument("--inits", nargs="+", default=["labels"])
    parser.add_argument("--losses", nargs="+", choices=list(Loss), default=[Loss.TOKENS])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--held-out-rows", type=int, default=500)
    parser.add_argument("--min-words", type=int, default=12, help="of a held-out row")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample-seed", type=int, default=0, help="which training rows are sampled")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (batch order)")
    args = parser.parse_args()
    method = Method(args.method)
    unknown = set(args.inits) - set(INITS[method])
    if unknown:
        parser.error(f"{method} cannot start from {sorted(unknown)}; one of {INITS[method]}")
    rates = args.rates or [METHOD_DEFAULTS[method].learning_rate]
    lengths = args.tokens or [METHOD_DEFAULTS[method].num_virtual_tokens]

    pool = rows("train")
    random.Random(args.sample_seed).shuffle(pool)
    train = pool[: args.train_rows]
    rest = pool[args.train_rows :]
    held_out = [ex for ex in rest if len(ex.input.split()) >= args.min_words][: args.held_out_rows]
    backbone = load()
    log(
        f"{method}: {args.train_rows} sampled SST-2 training rows (sample seed {args.sample_seed}), "
        f"{args.steps} steps of {args.batch_size}, seeds {args.seeds}; scored on {len(held_out)} other "
        f"training rows of {args.min_words} words or more"
    )
    log(f"bare template on the held-out rows: {accuracy(backbone, None, held_out):.3f}")
    start = init_prefix if method == Method.PREFIX else init_prompt
    for init, k, rate, loss in itertools.product(args.inits, lengths, rates, args.losses):
        scores, began = [], time.perf_counter()
        for seed in args.seeds:
            train_config = config(args.steps, args.batch_size, learning_rate=rate, method=method)
            train_config.seed, train_config.label_loss = seed, loss == Loss.LABELS
            result = train_prompt(
                backbone,
                prompt=start(backbone, num_virtual_tokens=k, strategy=init, labels=LABELS, seed=seed),
                train=train,
                validation=[],
                template=TEMPLATE,
                labels=LABELS,
                config=train_config,
                on_progress=lambda _: None,
                should_stop=lambda: False,
            )
            scores.append(accuracy(backbone, result.prompt, held_out))
        seconds = (time.perf_counter() - began) / len(args.seeds)
        log(
            f"  init {init:>6}, {k:>3} tokens, learning rate {rate:<6}, loss {loss:>6}: held-out accuracy "
            f"{statistics.mean(scores):.3f} ({', '.join(f'{s:.3f}' for s in scores)}; {seconds:.0f} s a run)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
