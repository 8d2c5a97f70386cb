"""Prompt tuning: AdamW on the k prompt vectors alone, the backbone frozen."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.ml.backbone import Backbone
from app.ml.batching import context_ids, fit_context, target_ids, target_log_probs
from app.ml.inference import classify
from app.ml.text import render

log = logging.getLogger(__name__)
# train_loss is the mean over the last steps: a single step's loss is too noisy to report.
LOSS_WINDOW = 10


@dataclass
class Example:
    input: str
    output: str


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 0.03
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    # Generation targets end with EOS so a task learns where to stop. Classification is scored by the
    # label tokens alone, and an EOS target there spends a short run on learning to stop instead of
    # telling labels apart (SST-2 measurements in docs/benchmarks.md).
    append_eos: bool = True


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    eta_seconds: float | None


@dataclass
class TrainResult:
    prompt: torch.Tensor  # [k, d] float32 CPU
    metrics: dict  # train_loss, val_loss, val_accuracy (None unless labels were given)
    steps_done: int
    stopped: bool


@dataclass
class _Encoded:
    context: list[int]  # rendered input, cut from the left to fit
    target: list[int]  # the continuation (+ eos for generation): the only tokens the loss sees


def _encode(
    backbone: Backbone, examples: list[Example], template: str, k: int, *, append_eos: bool
) -> list[_Encoded]:
    encoded = []
    for ex in examples:
        rendered = render(template, ex.input)
        target = target_ids(backbone, rendered, ex.output, with_eos=append_eos)
        context = fit_context(backbone, context_ids(backbone, rendered), k + len(target), truncate=True)
        encoded.append(_Encoded(context, target))
    return encoded


def _loss(backbone: Backbone, prompt: torch.Tensor, batch: list[_Encoded]) -> torch.Tensor:
    """Mean negative log-likelihood per target token (not per example: long outputs weigh more)."""
    log_probs, _ = target_log_probs(
        backbone, [prompt] * len(batch), [e.context for e in batch], [e.target for e in batch]
    )
    return -log_probs.mean()


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then linear decay that reaches zero just after the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


def _batches(n: int, size: int, generator: torch.Generator):
    """Endless shuffled epochs of example indices; a batch may straddle two epochs."""
    size = min(size, n)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending += torch.randperm(n, generator=generator).tolist()
        yield pending[:size]
        pending = pending[size:]


def evaluate(
    backbone: Backbone,
    prompt: torch.Tensor,
    validation: list[Example],
    *,
    template: str,
    labels: list[str] | None,
    batch_size: int = 8,
    append_eos: bool = True,
) -> dict:
    """val_loss (per target token) and, with labels, rank-classification accuracy."""
    if not validation:
        return {"val_loss": None, "val_accuracy": None}
    encoded = _encode(backbone, validation, template, len(prompt), append_eos=append_eos)
    total, count, correct = 0.0, 0, 0
    with torch.inference_mode():
        for start in range(0, len(validation), batch_size):
            chunk = encoded[start : start + batch_size]
            log_probs, _ = target_log_probs(
                backbone, [prompt] * len(chunk), [e.context for e in chunk], [e.target for e in chunk]
            )
            total -= log_probs.sum().item()
            count += len(log_probs)
            if labels:
                examples = validation[start : start + batch_size]
                scores = classify(
                    backbone,
                    prompts=[prompt] * len(examples),
                    texts=[render(template, ex.input) for ex in examples],
                    labels=labels,
                )
                correct += sum(max(s, key=s.get) == ex.output for s, ex in zip(scores, examples, strict=True))
    return {"val_loss": total / count, "val_accuracy": correct / len(validation) if labels else None}


def train_prompt(
    backbone: Backbone,
    *,
    prompt: torch.Tensor,
    train: list[Example],
    validation: list[Example],
    template: str,
    labels: list[str] | None,
    config: TrainConfig,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> TrainResult:
    """Tune ``prompt`` ([k, d]) on ``train``; the same seed and data give the same prompt."""
    encoded = _encode(backbone, train, template, len(prompt), append_eos=config.append_eos)
    # The master copy stays float32 even on a bfloat16 backbone: the updates are small.
    param = torch.nn.Parameter(prompt.detach().to(backbone.device, torch.float32).clone())  # [k, d]
    optimizer = torch.optim.AdamW([param], lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    batches = _batches(len(encoded), config.batch_size, torch.Generator().manual_seed(config.seed))

    def run_eval(current: torch.Tensor) -> dict:
        return evaluate(
            backbone,
            current,
            validation,
            template=template,
            labels=labels,
            batch_size=config.batch_size,
            append_eos=config.append_eos,
        )

    losses: list[float] = []
    metrics: dict = {}
    stopped = False
    started = time.monotonic()
    for step in range(config.steps):
        if should_stop():
            stopped = True
            break
        loss = _loss(backbone, param, [encoded[i] for i in next(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([param], config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        done = step + 1
        elapsed = time.monotonic() - started
        on_progress(Progress(done, config.steps, losses[-1], elapsed / done * (config.steps - done)))
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            metrics = run_eval(param.detach())
            log.info("step %d/%d: %s", done, config.steps, metrics)
    final = param.detach().float().cpu().clone()  # [k, d]
    if not stopped:
        metrics = run_eval(final)
    window = losses[-LOSS_WINDOW:]
    metrics = {
        "train_loss": sum(window) / len(window) if window else None,
        "val_loss": metrics.get("val_loss"),
        "val_accuracy": metrics.get("val_accuracy"),
    }
    return TrainResult(prompt=final, metrics=metrics, steps_done=len(losses), stopped=stopped)
