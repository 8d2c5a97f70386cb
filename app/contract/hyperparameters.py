"""A tuning job's hyperparameters, one typed model for all of their life: what a client sends (native or
through the OpenAI-compatible route), what a job stores (``model_dump``), and what the trainer gets
(``TrainConfig.of`` in app/ml/trainer.py). The defaults were measured on SST-2 (docs/benchmarks.md):
label-word init, AdamW with a linear warm-up over the first 10 % of the steps, then linear decay, batches
of 32; the method, its learning rate and its length as METHOD_DEFAULTS says."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.contract.kinds import (
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    DatasetKind,
    EvalMetric,
    Method,
    default_metric,
)
from app.errors import InvalidRequest


@dataclass(frozen=True)
class MethodDefaults:
    learning_rate: float
    num_virtual_tokens: int


# What a job that names none of them gets, per method, chosen on held-out SST-2 training rows
# (docs/benchmarks.md, "Prefix tuning: choosing its defaults"). A prefix reaches every layer: at the
# prompt's 0.03 it overshot (held-out accuracy 0.758 on 400 rows, 0.820 at 0.01), and 10 positions did
# better than 20 (0.842). Prompt tuning at its defaults scored 0.792, the bare template 0.798.
METHOD_DEFAULTS = {
    Method.PROMPT: MethodDefaults(learning_rate=0.03, num_virtual_tokens=20),
    Method.PREFIX: MethodDefaults(learning_rate=0.01, num_virtual_tokens=10),
}
DEFAULT_METHOD = Method.PREFIX  # a job that names no method


def per_method(field: str) -> str:
    """A MethodDefaults field as a description says it: "0.03 for prompt, 0.01 for prefix"."""
    return ", ".join(f"{getattr(d, field)} for {m.value}" for m, d in METHOD_DEFAULTS.items())


# Default length: DEFAULT_EPOCHS passes over the data, within [MIN_DEFAULT_STEPS, MAX_DEFAULT_STEPS]. The
# floor gives a small dataset enough updates; the ceiling fills about 20 of a job's 30 minutes on the
# full SST-2 training split on 2 CPU cores (25,600 examples seen; docs/benchmarks.md).
DEFAULT_EPOCHS = 3
MIN_DEFAULT_STEPS = 100
MAX_DEFAULT_STEPS = 800
WARMUP_FRACTION = 0.1
# A generation job's hold-out is decoded greedily up to its longest output plus a few tokens, and never
# past this many, to be scored with the evaluation metrics.
HOLDOUT_DECODE_TOKENS = 256


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAFACTOR = "adafactor"


class Loss(StrEnum):
    """``tokens``: the likelihood of the target tokens over the whole vocabulary; ``labels``:
    classification with one-token labels learns from a cross-entropy over the labels alone (no more
    accurate on SST-2)."""

    LABELS = "labels"
    TOKENS = "tokens"


class Hyperparameters(BaseModel):
    """As given, ``steps`` and ``warmup_steps`` may be left out; ``resolve`` fills them in for the data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        description=f"Default: {DEFAULT_EPOCHS} epochs, within 100-800 steps.",
    )
    epochs: float | None = Field(default=None, gt=0, le=1000, description="Instead of steps.")
    batch_size: int = Field(default=32, strict=True, ge=1, le=256)
    learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description=f"Default: {per_method('learning_rate')}.",
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int | None = Field(
        default=None, strict=True, ge=0, description="Default: 10 % of the steps."
    )
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=0, strict=True, ge=0, le=2**31 - 1)
    eval_every: int = Field(
        default=0, strict=True, ge=0, description="Evaluate every N steps (0: at the end)."
    )
    patience: int = Field(
        default=0,
        strict=True,
        ge=0,
        description="Stop after this many evaluations without improvement (0: never).",
    )
    optimizer: Optimizer = Optimizer.ADAMW
    eval_metric: EvalMetric | None = Field(
        default=None,
        description="The hold-out metric that picks the best soft prompt and that it must not score below "
        "the bare template on. Classification: accuracy (default), macro_f1, loss. Generation: rouge_l "
        "(default), bleu, chrf, exact_match, f1, loss.",
    )
    loss: Loss = Field(
        default=Loss.TOKENS,
        description="labels: a cross-entropy over the label words (classification, one-token labels); "
        "tokens: the target tokens' likelihood over the vocabulary.",
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A field sent as null takes its default, as if it had not been sent."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @classmethod
    def of(cls, values: dict[str, Any]) -> Hyperparameters:
        """From a dict built on the server (the OpenAI route's mapping); a bad value is the client's."""
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise InvalidRequest(f"{field}: {first['msg']}.", param=f"hyperparameters.{field}") from None

    def given(self) -> dict[str, Any]:
        """The fields the client set, as JSON: what identifies a request for its Idempotency-Key."""
        return self.model_dump(mode="json", exclude_unset=True)

    def stored(self) -> dict[str, Any]:
        """As a job's row keeps them: every value set (``epochs`` only when it was given)."""
        return self.model_dump(mode="json", exclude_none=True)

    def resolve(
        self, num_examples: int, *, max_steps: int, method: Method, classification: bool
    ) -> Hyperparameters:
        """The values a job of ``method`` runs with on ``num_examples`` training examples: steps from the
        epochs or the default length, the warm-up from the steps, the method's learning rate, the task
        kind's metric; refused past ``max_steps`` or with a metric of the other kind."""
        if self.steps is not None and self.epochs is not None:
            raise InvalidRequest("Give either steps or epochs, not both.", param="hyperparameters.epochs")
        steps = self.steps
        if self.epochs is not None:
            steps = max(1, math.ceil(self.epochs * num_examples / self.batch_size))
        elif steps is None:
            steps = default_steps(num_examples, self.batch_size)
        if not 1 <= steps <= max_steps:
            raise InvalidRequest(
                f"steps must be between 1 and {max_steps}; got {steps}.", param="hyperparameters.steps"
            )
        warmup = self.warmup_steps if self.warmup_steps is not None else round(WARMUP_FRACTION * steps)
        rate = self.learning_rate
        if rate is None:
            rate = METHOD_DEFAULTS[method].learning_rate
        metric = self.eval_metric or default_metric(classification=classification)
        fitting = CLASSIFICATION_METRICS if classification else GENERATION_METRICS
        if metric not in fitting:
            kind = DatasetKind.CLASSIFICATION if classification else DatasetKind.GENERATION
            raise InvalidRequest(
                f"eval_metric {metric.value} does not score a {kind} dataset; use one of "
                f"{', '.join(m.value for m in fitting)}.",
                param="hyperparameters.eval_metric",
            )
        update = {"steps": steps, "warmup_steps": warmup, "learning_rate": rate, "eval_metric": metric}
        return self.model_copy(update=update)


def default_steps(num_examples: int, batch_size: int) -> int:
    epochs = math.ceil(DEFAULT_EPOCHS * num_examples / batch_size)
    return min(MAX_DEFAULT_STEPS, max(MIN_DEFAULT_STEPS, epochs))
