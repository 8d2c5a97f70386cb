"""Prompt tuning, ours against PEFT's, on the same backbone, data, batches and number of steps, in one run.

    .venv/bin/python bench/tuning.py                 # the comparison (about 15 minutes on 2 cores)
    .venv/bin/python bench/tuning.py --full-job      # and a default job on the full SST-2 training split
    .venv/bin/python bench/tuning.py --methods --dev-rows 200    # and prefix tuning, PEFT prefix and LoRA
    .venv/bin/python bench/tuning.py --train-rows 67349 --steps 400 --batch-size 32 \
        --trainers ours ours-prefix peft-guide peft-prefix peft-lora        # the large budget

Each trainer runs in its own process, so its peak memory (max RSS above the loaded model) is its own.
All see the same rows in the same order (our trainer's seeded batch order), the template
`Review: {input}\\nSentiment:` and 20 virtual tokens. Three trainers:

- ours, with the defaults a job gets when it names no hyperparameters (label-word init, AdamW 0.03 with a
  10 % warm-up then linear decay, loss on the label token);
- PEFT as its prompt-tuning guide for causal LMs sets it up: the prompt initialised from a task description,
  AdamW 0.03 with linear decay and no warm-up, loss on the label tokens and an end-of-text token;
- PEFT with exactly our settings: the same computation, so its accuracy should match ours and its time per
  step is the fair speed peer.

Accuracy is rank classification over the label words on the SST-2 dev split (872 rows), and zero-shot with
the same template is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.contract.hyperparameters import DEFAULT_METHOD, METHOD_DEFAULTS, Hyperparameters  # noqa: E402
from app.contract.kinds import Method  # noqa: E402
from app.ml.backbone import Backbone, load_backbone, materialize_backbone  # noqa: E402
from app.ml.inference import classify  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt  # noqa: E402
from app.ml.text import render  # noqa: E402
from app.ml.trainer import BatchOrder, Example, TrainConfig, lr_factor, train_prompt  # noqa: E402
from app.services.tuning.training import split_holdout  # noqa: E402

SST2 = ROOT.parent / "shared/data/sst2"
TEMPLATE = "Review: {input}\nSentiment:"
LABELS = ["negative", "positive"]
VIRTUAL_TOKENS = 20


def log(message: str) -> None:
    print(message, flush=True)


def rows(name: str) -> list[Example]:
    with (SST2 / f"{name}.jsonl").open() as f:
        return [Example(r["text"], r["label"]) for r in map(json.loads, f)]


def load() -> Backbone:
    settings = Settings(backbone_dir=ROOT / ".cache/backbones")
    name = settings.default_backbone
    return load_backbone(
        name, materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
    )


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def accuracy(
    backbone: Backbone,
    prompt: torch.Tensor | None,
    dev: list[Example],
    *,
    template: str = TEMPLATE,
    labels: list[str] = LABELS,
) -> float:
    """Rank classification over the label words (SST-2's unless given)."""
    correct = 0
    for start in range(0, len(dev), 32):
        chunk = dev[start : start + 32]
        scores = classify(
            backbone,
            prompts=[prompt] * len(chunk),
            texts=[render(template, ex.input) for ex in chunk],
            labels=labels,
        )
        correct += sum(max(s, key=s.get) == ex.output for s, ex in zip(scores, chunk, strict=True))
    return correct / len(dev)


def config(
    steps: int,
    batch_size: int,
    *,
    warmup: bool = True,
    learning_rate: float | None = None,
    method: Method = Method.PROMPT,
) -> TrainConfig:
    """A job's defaults for ``method`` at this length and batch; without ``warmup``, none."""
    given = {"steps": steps, "batch_size": batch_size}
    given |= {} if warmup else {"warmup_steps": 0}
    given |= {} if learning_rate is None else {"learning_rate": learning_rate}
    resolved = Hyperparameters(**given).resolve(
        steps * batch_size, max_steps=steps, method=method, classification=True
    )
    return TrainConfig.of(resolved, classification=True)


def run_ours(
    train: list[Example],
    dev: list[Example],
    steps: int,
    batch_size: int,
    *,
    method: Method = Method.PROMPT,
    learning_rate: float | None = None,
) -> dict:
    backbone = load()
    baseline = max_rss()
    start = init_prefix if method == Method.PREFIX else init_prompt
    # Prompt tuning at the comparison's length; a prefix at its job default, as PEFT's prefix is run.
    k = VIRTUAL_TOKENS if method == Method.PROMPT else METHOD_DEFAULTS[method].num_virtual_tokens
    prompt = start(backbone, num_virtual_tokens=k, strategy="labels", labels=LABELS)
    stamps: list[float] = []
    result = train_prompt(
        backbone,
        prompt=prompt,
        train=train,
        validation=[],
        template=TEMPLATE,
        labels=LABELS,
        config=config(steps, batch_size, learning_rate=learning_rate, method=method),
        on_progress=lambda _: stamps.append(time.perf_counter()),
        should_stop=lambda: False,
    )
    peak = max_rss() - baseline
    return {
        "step_seconds": _median_step(stamps),
        "peak_bytes": peak,
        "accuracy": accuracy(backbone, result.prompt, dev),
        "zero_shot": accuracy(backbone, None, dev),
    }


# PEFT's guide initialises from a description of the task; this is its sentence, said of reviews.
GUIDE_INIT_TEXT = "Classify if the review is positive or negative:"
# Child process name -> PEFT recipe (None: our trainer).
TRAINERS = {"ours": None, "peft-guide": "guide", "peft-ours": "ours"}
# The other methods (--methods): ours as prefix tuning, PEFT's prefix tuning and LoRA, at the learning
# rates the hardening issue's table used for PEFT (1e-2 prefix, 1e-3 LoRA) and ours as given.
METHOD_TRAINERS = {"ours-prefix": None, "peft-prefix": "prefix", "peft-lora": "lora"}
PEFT_RATES = {"prefix": 1e-2, "lora": 1e-3}


def run_peft(train: list[Example], dev: list[Example], steps: int, batch_size: int, recipe: str) -> dict:
    """``recipe`` "guide": PEFT's prompt-tuning guide; "ours": our defaults, for the equal-work timing;
    "prefix": PEFT's prefix tuning (its own init); "lora": LoRA r 8 on every linear projection."""
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_peft_model,
    )

    backbone = load()
    baseline = max_rss()
    tokenizer = backbone.tokenizer
    guide = recipe == "guide"
    if recipe == "prefix":
        peft_config = PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=METHOD_DEFAULTS[Method.PREFIX].num_virtual_tokens
        )
    elif recipe == "lora":
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"
        )
    else:
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=VIRTUAL_TOKENS,
            prompt_tuning_init=PromptTuningInit.TEXT,
            # Ours starts from the label words; PEFT's TEXT init cycles the text's tokens the same way.
            prompt_tuning_init_text=GUIDE_INIT_TEXT if guide else " negative positive",
            tokenizer_name_or_path=str(backbone.model.name_or_path),
        )
    model = get_peft_model(backbone.model, peft_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    train_config = config(steps, batch_size, warmup=not guide, learning_rate=PEFT_RATES.get(recipe))
    optimizer = torch.optim.AdamW(params, lr=train_config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train_config))
    batches = BatchOrder(batch_size, len(train), train_config.seed)
    stamps = []
    for _ in range(steps):
        batch = [train[i] for i in batches.next()]
        input_ids, attention_mask, labels = peft_batch(tokenizer, batch, end_token=guide)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not guide:  # the guide does not clip
            torch.nn.utils.clip_grad_norm_(params, train_config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        stamps.append(time.perf_counter())
    peak = max_rss() - baseline
    model.eval()
    # Prompt tuning puts its virtual tokens in the logits too; prefix tuning and LoRA do not.
    offset = VIRTUAL_TOKENS if recipe in ("guide", "ours") else 0
    return {
        "step_seconds": _median_step(stamps),
        "peak_bytes": peak,
        "accuracy": _peft_accuracy(model, tokenizer, dev, offset=offset),
    }


def peft_batch(tokenizer, batch: list[Example], *, end_token: bool, template: str = TEMPLATE):
    """Right-padded [rendered input][" " output](end-of-text) rows; the loss sees the targets only."""
    sequences, masks = [], []
    for ex in batch:
        context = tokenizer(render(template, ex.input), add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + ex.output, add_special_tokens=False)["input_ids"]
        target += [tokenizer.eos_token_id] if end_token else []
        sequences.append(context + target)
        masks.append([-100] * len(context) + target)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = torch.tensor([m + [-100] * (width - len(m)) for m in masks])
    return input_ids, attention_mask, labels


def _peft_accuracy(model, tokenizer, dev: list[Example], *, offset: int) -> float:
    """Rank classification with the PEFT model, 32 rows at a time, right-padded: each row is read at its
    own last input position (after the ``offset`` virtual tokens PEFT puts first in prompt tuning)."""
    label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(dev), 32):
            chunk = dev[start : start + 32]
            ids = [
                tokenizer(render(TEMPLATE, ex.input), add_special_tokens=False)["input_ids"] for ex in chunk
            ]
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
            attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, k + width, V]
            last = torch.tensor([offset + len(row) - 1 for row in ids])
            picked = logits[torch.arange(len(ids)), last][:, label_ids]  # [B, labels]
            correct += sum(LABELS[int(p.argmax())] == ex.output for p, ex in zip(picked, chunk, strict=True))
    return correct / len(dev)


def _median_step(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps[2:] or gaps)  # the first steps warm caches up


def run_full_job(method: Method) -> dict:
    """The default job of ``method`` on the full training split as the worker runs it: no hyperparameters
    given, the seeded hold-out, label-word init, every setting at its default."""
    backbone = load()
    train, dev = rows("train"), rows("dev")
    defaults = Hyperparameters()
    kept, held = split_holdout(train, seed=defaults.seed)
    hp = defaults.resolve(len(kept), max_steps=Settings().max_steps, method=method, classification=True)
    start = init_prefix if method == Method.PREFIX else init_prompt
    k = METHOD_DEFAULTS[method].num_virtual_tokens
    started = time.perf_counter()
    result = train_prompt(
        backbone,
        prompt=start(backbone, num_virtual_tokens=k, strategy="labels", labels=LABELS),
        train=kept,
        validation=held,
        template=TEMPLATE,
        labels=LABELS,
        config=TrainConfig.of(hp, classification=True),
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    return {
        "seconds": time.perf_counter() - started,
        "steps": hp.steps,
        "batch_size": hp.batch_size,
        "holdout_accuracy": result.metrics["val_accuracy"],
        "accuracy": accuracy(backbone, result.prompt, dev),
    }


def report_full_job(full: dict, method: str) -> int:
    log(
        f"default {method} job on the full training split: {full['steps']} steps of {full['batch_size']} "
        f"in {full['seconds'] / 60:.1f} min (hold-out accuracy {full['holdout_accuracy']:.3f}), "
        f"SST-2 dev accuracy {full['accuracy']:.3f}   (target >= 0.91 within 30 min)"
    )
    return 0


def report_prompt_tuning(figures: dict[str, dict]) -> None:
    """Ours against PEFT's prompt tuning, where the run has all three."""
    if not {"ours", "peft-guide", "peft-ours"} <= figures.keys():
        return
    ours, guide, same = figures["ours"], figures["peft-guide"], figures["peft-ours"]
    log(
        f"time per step, ours / PEFT = {ours['step_seconds'] / same['step_seconds']:.2f} with our settings, "
        f"{ours['step_seconds'] / guide['step_seconds']:.2f} with its guide's   (target <= 0.7)"
    )
    log(
        f"dev accuracy, ours - PEFT = {ours['accuracy'] - guide['accuracy']:+.3f} against its guide's "
        f"settings   (target > 0); {ours['accuracy'] - same['accuracy']:+.3f} against our settings"
    )


def report_methods(figures: dict[str, dict]) -> None:
    """Ours as prefix tuning against PEFT's best soft prompt (prompt by its guide, or prefix) and LoRA."""
    if "ours-prefix" not in figures:
        return
    prefix = figures["ours-prefix"]
    soft = [figures[name]["accuracy"] for name in ("peft-guide", "peft-prefix") if name in figures]
    if soft:
        log(
            f"dev accuracy, ours prefix - PEFT's best soft prompt = {prefix['accuracy'] - max(soft):+.3f}   "
            "(target >= +0.020)"
        )
    if "peft-lora" in figures:
        log(
            f"dev accuracy, ours prefix - PEFT LoRA = "
            f"{prefix['accuracy'] - figures['peft-lora']['accuracy']:+.3f}   (target >= -0.010)"
        )
    if "peft-prefix" in figures:
        log(
            f"time per step, ours prefix / PEFT prefix = "
            f"{prefix['step_seconds'] / figures['peft-prefix']['step_seconds']:.2f}   (target <= 0.7)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--train-rows", type=int, default=400, help="rows from the start of the training split"
    )
    parser.add_argument("--dev-rows", type=int, default=872, help="dev rows scored, from the start")
    parser.add_argument("--full-job", action="store_true")
    parser.add_argument("--only-full-job", action="store_true", help="the full job without the comparison")
    parser.add_argument(
        "--full-method", choices=list(Method), default=DEFAULT_METHOD, help="the full job's method"
    )
    parser.add_argument(
        "--methods", action="store_true", help="also ours as prefix tuning, PEFT prefix tuning and PEFT LoRA"
    )
    parser.add_argument("--prefix-lr", type=float, default=None, help="learning rate of ours-prefix")
    parser.add_argument(
        "--trainers",
        nargs="+",
        choices=[*TRAINERS, *METHOD_TRAINERS],
        help="only these (default: the prompt-tuning three, and with --methods the other three)",
    )
    parser.add_argument("--trainer", choices=[*TRAINERS, *METHOD_TRAINERS, "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.trainer:  # a child process: one trainer, its figures as JSON on the last line
        train, dev = rows("train")[: args.train_rows], rows("dev")[: args.dev_rows]
        if args.trainer == "full":
            figures = run_full_job(Method(args.full_method))
        elif args.trainer == "ours":
            figures = run_ours(train, dev, args.steps, args.batch_size)
        elif args.trainer == "ours-prefix":
            figures = run_ours(
                train, dev, args.steps, args.batch_size, method=Method.PREFIX, learning_rate=args.prefix_lr
            )
        else:
            recipe = {**TRAINERS, **METHOD_TRAINERS}[args.trainer]
            figures = run_peft(train, dev, args.steps, args.batch_size, recipe=recipe)
        print(json.dumps(figures))
        return 0

    def child(trainer: str) -> dict:
        argv = [sys.executable, __file__, "--trainer", trainer, "--steps", str(args.steps)]
        argv += ["--batch-size", str(args.batch_size), "--train-rows", str(args.train_rows)]
        argv += ["--dev-rows", str(args.dev_rows), "--full-method", str(args.full_method)]
        argv += [] if args.prefix_lr is None else ["--prefix-lr", str(args.prefix_lr)]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    if args.only_full_job:
        log(f"the default {args.full_method} job on the full SST-2 training split; dev accuracy on 872 rows")
        return report_full_job(child("full"), args.full_method)
    log(
        f"{args.train_rows} SST-2 training rows, {args.steps} steps of batch {args.batch_size}, "
        f"{VIRTUAL_TOKENS} virtual tokens for prompt tuning and "
        f"{METHOD_DEFAULTS[Method.PREFIX].num_virtual_tokens} for prefix tuning; "
        f"dev accuracy on the first {args.dev_rows} of the 872 dev rows; "
        f"torch threads {torch.get_num_threads()}"
    )
    names = args.trainers or [*TRAINERS, *(METHOD_TRAINERS if args.methods else [])]
    figures = {}
    for name in names:  # each row as it comes: a large budget runs for over an hour
        row = figures[name] = child(name)
        log(
            f"{name:>11}: {row['step_seconds']:.3f} s per step (median), peak memory "
            f"+{row['peak_bytes'] / 2**20:.0f} MiB, SST-2 dev accuracy {row['accuracy']:.3f}"
        )
    zero_shot = next((row["zero_shot"] for row in figures.values() if "zero_shot" in row), None)
    if zero_shot is not None:
        log(f"zero-shot, same template: {zero_shot:.3f}")
    report_prompt_tuning(figures)
    report_methods(figures)
    if args.full_job:
        report_full_job(child("full"), args.full_method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
