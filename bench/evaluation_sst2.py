"""An evaluation of three models on all 872 SST-2 dev rows against the same rows classified one at a time.

    .venv/bin/python bench/evaluation_sst2.py          # about 10 minutes on 2 cores

Two versions of one task (the default job on 400 seeded training rows, 30 and then 60 steps of 8) and the
bare backbone with their template, scored by an evaluation run here as a worker runs it; then every dev
row classified alone, as a client calling /v1/classify once per row would get it (the same classify the
route runs, with the version's soft prompt as serving decodes it). Printed: each model's accuracy both
ways, how many rows got the same label, and the wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ml.inference import classify  # noqa: E402
from app.ml.text import render  # noqa: E402
from bench.in_process import Registry  # noqa: E402
from bench.tuning import load, log  # noqa: E402

SST2 = ROOT.parent / "shared/data/sst2"
TEMPLATE = "Review: {input}\nSentiment:"
LABELS = ["negative", "positive"]


def read(name: str) -> list[dict]:
    with (SST2 / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--dev-rows", type=int, default=None, help="default: all 872")
    args = parser.parse_args()
    train = read("train")
    random.Random(0).shuffle(train)
    train, dev = train[: args.train_rows], read("dev")[: args.dev_rows]
    registry = Registry(load())
    try:
        training = registry.upload(train, "train.jsonl")
        for steps in (30, 60):
            job = registry.tune(task="sst2", dataset=training, template=TEMPLATE, steps=steps, batch_size=8)
            log(f"sst2@{job['version']}: {steps} steps of 8, {job['outcome']} in {job['seconds']:.0f} s")
        models = ["sst2@1", "sst2@2", None]
        evaluation = registry.evaluate(dataset=registry.upload(dev, "dev.jsonl"), models=models)
        log(f"evaluation of {len(models)} models on {len(dev)} rows: {evaluation['seconds']:.0f} s")
        prompts = {ref: registry.soft_prompt(ref) for ref in models if ref is not None} | {None: None}
        report(registry, dev, evaluation, prompts)
    finally:
        registry.close()
    return 0


def report(registry: Registry, dev: list[dict], evaluation: dict, prompts: dict) -> None:
    log("\n| model | evaluation accuracy | one row at a time | same label |\n| --- | --- | --- | --- |")
    started = time.perf_counter()
    for index, (ref, prompt) in enumerate(prompts.items()):
        alone = [
            _label(
                classify(
                    registry.backbone, labels=LABELS, prompts=[prompt], texts=[render(TEMPLATE, r["text"])]
                )
            )
            for r in dev
        ]
        batched = [line["predictions"][index]["output"] for line in evaluation["predictions"]]
        accuracy = sum(a == r["label"] for a, r in zip(alone, dev, strict=True)) / len(dev)
        same = sum(a == b for a, b in zip(alone, batched, strict=True))
        figure = evaluation["results"][ref]["accuracy"]
        log(f"| {ref or 'bare backbone'} | {figure:.4f} | {accuracy:.4f} | {same} of {len(dev)} |")
    log(f"\none row at a time: {time.perf_counter() - started:.0f} s for {len(prompts)} x {len(dev)} rows")


def _label(scored: list[dict[str, float]]) -> str:
    return max(scored[0], key=scored[0].get)


if __name__ == "__main__":
    sys.exit(main())
