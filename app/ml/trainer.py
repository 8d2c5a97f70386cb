"""Prompt tuning: AdamW on the k prompt vectors alone, the backbone frozen."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.contract.hyperparameters import HOLDOUT_DECODE_TOKENS, Hyperparameters, Loss
from app.contract.kinds import EvalMetric, default_metric
from app.ml.backbone import Backbone
from app.ml.checkpoint import Checkpoint
from app.ml.generation_scores import generation_report, sentence_score
from app.ml.inference import generate, label_log_likelihoods
from app.ml.layout import context_ids, fit_context, target_ids, target_log_probs, target_logits
from app.ml.scores import classification_report
from app.ml.selection import DECODED_METRICS, bare_key, rank, tuned_key
from app.ml.soft_prompt import virtual_tokens
from app.ml.text import continuation, render
from app.ml.versus_bare import Comparison, compare

log = logging.getLogger(__name__)
# train_loss is the mean over the last steps: a single step's loss is too noisy to report.
LOSS_WINDOW = 10


@dataclass
class Example:
    input: str
    output: str


@dataclass
class TrainConfig:
    """The trainer's settings. The product's defaults for them are in app/contract/hyperparameters.py;
    here only the switches that are off unless asked for have defaults."""

    steps: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    seed: int
    optimizer: str  # "adamw" or "adafactor"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    eval_every: int = 0  # 0 = only at the end
    # With eval_every: stop after this many evaluations without improvement (0 = never stop early). The
    # prompt returned is the best one evaluated either way.
    patience: int = 0
    checkpoint_every: int = 0  # steps between checkpoints handed to on_checkpoint; 0 = none
    # Generation targets end with EOS so a task learns where to stop. Classification is scored by the
    # label tokens alone, and an EOS target there spends a short run on learning to stop instead of
    # telling labels apart (SST-2 measurements in docs/benchmarks.md).
    append_eos: bool = True
    # Classification whose labels are one token each can learn from a cross-entropy over the labels'
    # logits alone, the choice it is scored on. Off by default: on SST-2 it was no more accurate than the
    # per-token likelihood, and the label stops being the likeliest next token (docs/benchmarks.md).
    label_loss: bool = False
    # The hold-out metric that picks the best prompt; None: accuracy for classification, ROUGE-L for
    # generation (app/ml/selection.py).
    eval_metric: EvalMetric | None = None
    # Generation: decode the hold-out greedily, up to its longest output plus DECODE_MARGIN tokens but at
    # most this many, to score it with exact match, F1, BLEU, chrF and ROUGE-L. 0: the loss alone.
    decode_tokens: int = 0

    @classmethod
    def of(cls, hp: Hyperparameters, *, classification: bool, checkpoint_every: int = 0) -> TrainConfig:
        """The trainer's settings for a job's resolved hyperparameters (Hyperparameters.resolve)."""
        if hp.steps is None or hp.warmup_steps is None or hp.learning_rate is None:
            raise ValueError("TrainConfig.of() needs resolved hyperparameters; call resolve() first")
        return cls(
            steps=hp.steps,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
            max_grad_norm=hp.max_grad_norm,
            seed=hp.seed,
            eval_every=hp.eval_every,
            patience=hp.patience,
            optimizer=hp.optimizer.value,
            append_eos=not classification,
            label_loss=hp.loss is Loss.LABELS,
            eval_metric=hp.eval_metric,
            decode_tokens=0 if classification else HOLDOUT_DECODE_TOKENS,
            checkpoint_every=checkpoint_every,
        )

    def metric(self, *, classification: bool) -> EvalMetric:
        chosen = self.eval_metric or default_metric(classification=classification)
        if not classification and not self.decode_tokens and chosen in DECODED_METRICS:
            return EvalMetric.LOSS  # nothing is decoded, so the loss is all there is to go by
        return chosen


@dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    eta_seconds: float | None


@dataclass
class TrainResult:
    prompt: torch.Tensor  # [k, d] (prompt) or [2, L, H_kv, k, Dh] (prefix), float32 CPU
    metrics: dict  # train_loss, val_loss, val_accuracy (None unless labels were given)
    steps_done: int
    stopped: bool
    state: Checkpoint | None = None  # when stopped: where it stopped, to continue from later
    # The kept prompt against the bare template on the hold-out; None without one. When ``worse``, the
    # job publishes nothing.
    versus_bare: Comparison | None = None


@dataclass
class _Encoded:
    context: list[int]  # rendered input, cut from the left to fit
    target: list[int]  # the continuation (+ eos for generation): the only tokens the loss sees
    choices: list[int] | None = None  # with the label loss: each label's one token, in the labels' order
    answer: int = 0  # with the label loss: the index of this example's label in choices


def _encode(
    backbone: Backbone,
    examples: list[Example],
    template: str,
    k: int,
    *,
    append_eos: bool,
    labels: list[str] | None = None,
) -> list[_Encoded]:
    """With ``labels``, each example also gets its label choices, if every label of every example is one
    token and every output is a label; otherwise none does."""
    encoded, rendered_inputs = [], [render(template, ex.input) for ex in examples]
    for ex, rendered in zip(examples, rendered_inputs, strict=True):
        target = target_ids(backbone, rendered, ex.output, with_eos=append_eos)
        context = fit_context(backbone, context_ids(backbone, rendered), k + len(target), truncate=True)
        encoded.append(_Encoded(context, target))
    if labels and all(ex.output in labels for ex in examples):
        # A label's tokens depend on its input only through the space continuation() puts before it.
        by_space: dict[str, list[int] | None] = {}
        choices = []
        for rendered in rendered_inputs:
            space = continuation(rendered, "")
            if space not in by_space:
                by_space[space] = _label_tokens(backbone, rendered, labels)
            choices.append(by_space[space])
        if all(c is not None for c in choices):
            for e, ex, c in zip(encoded, examples, choices, strict=True):
                e.choices, e.answer = c, labels.index(ex.output)
    return encoded


def _label_tokens(backbone: Backbone, rendered: str, labels: list[str]) -> list[int] | None:
    """Each label's token after ``rendered``, or None when some label takes more than one."""
    ids = [target_ids(backbone, rendered, label, with_eos=False) for label in labels]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None


def _loss(backbone: Backbone, prompt: torch.Tensor, batch: list[_Encoded]) -> torch.Tensor:
    """The label loss (cross-entropy over the label choices) when the batch has choices; otherwise the mean
    negative log-likelihood per target token (not per example: long outputs weigh more)."""
    if all(e.choices is not None for e in batch):
        logits, _ = target_logits(  # [B, V]: each target is its label's one token
            backbone, [prompt] * len(batch), [e.context for e in batch], [e.target for e in batch]
        )
        choices = torch.tensor([e.choices for e in batch], device=logits.device)  # [B, labels]
        answers = torch.tensor([e.answer for e in batch], device=logits.device)  # [B]
        return torch.nn.functional.cross_entropy(logits.gather(-1, choices), answers)
    log_probs, _ = target_log_probs(
        backbone, [prompt] * len(batch), [e.context for e in batch], [e.target for e in batch]
    )
    return -log_probs.mean()


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then linear decay that reaches zero just after the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


class BatchOrder:
    """Endless shuffled epochs of example indices; a batch may straddle two epochs. Its whole state is the
    generator's and the indices drawn but not used, so a checkpoint can carry it. (Rows are packed, not
    padded, so grouping batches by length would save nothing; on SST-2 it cost accuracy.)"""

    def __init__(self, size: int, count: int, seed: int):
        self.size, self.count = min(size, count), count
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []

    def next(self) -> list[int]:
        while len(self.pending) < self.size:
            self.pending += torch.randperm(self.count, generator=self.generator).tolist()
        batch, self.pending = self.pending[: self.size], self.pending[self.size :]
        return batch


def evaluate(
    backbone: Backbone,
    prompt: torch.Tensor | None,
    validation: list[Example],
    *,
    template: str,
    labels: list[str] | None,
    batch_size: int = 8,
    append_eos: bool = True,
    decode_tokens: int = 0,
    rows_by: EvalMetric | None = None,
) -> dict:
    """val_loss (per target token) and, with labels, rank classification's val_accuracy, val_macro_f1 and
    val_per_label (precision, recall, F1, support); without labels and with ``decode_tokens``, the greedy
    outputs' val_exact_match, val_f1, val_bleu, val_chrf and val_rouge_l. ``prompt`` None evaluates the
    bare backbone. With ``rows_by``, ``ROWS_KEY`` holds each row's score by that metric, for the paired test
    against the bare template (app/ml/versus_bare.py): whether the row was right for accuracy and macro-F1
    (which has no per-row value), its loss per target token, or its sentence score."""
    if not validation:
        return {"val_loss": None, "val_accuracy": None}
    scored_by_labels = labels and not append_eos and all(ex.output in labels for ex in validation)
    if scored_by_labels:
        # Every target is a label: the labels' log-likelihoods give the loss too, so one pass does both.
        losses, predicted = _label_pass(backbone, prompt, validation, template, labels, batch_size)
    else:
        losses = _loss_pass(backbone, prompt, validation, template, batch_size, append_eos)
        predicted = []
        if labels:
            predicted = _label_pass(backbone, prompt, validation, template, labels, batch_size)[1]
    metrics = {"val_loss": losses.per_token(), "val_accuracy": None}
    truth = [ex.output for ex in validation]
    outputs: list[str] = []
    if labels:
        report = classification_report(truth, predicted, labels)
        metrics.update(
            val_accuracy=report["accuracy"],
            val_macro_f1=report["macro_f1"],
            val_per_label=report["per_label"],
        )
    elif decode_tokens:
        outputs = _decode(backbone, prompt, validation, template, decode_tokens)
        report = generation_report(outputs, [[t] for t in truth])
        metrics.update({tuned_key(m): report[m.value] for m in DECODED_METRICS})
    if rows_by is EvalMetric.LOSS:
        metrics[ROWS_KEY] = losses.per_row()
    elif rows_by is not None and labels:
        metrics[ROWS_KEY] = [float(p == t) for p, t in zip(predicted, truth, strict=True)]
    elif rows_by is not None and outputs:
        metrics[ROWS_KEY] = [
            sentence_score(o, [t], rows_by.value) for o, t in zip(outputs, truth, strict=True)
        ]
    return metrics


# Where evaluate() puts the per-row scores; a job's reported metrics leave them out.
ROWS_KEY = "val_rows"


@dataclass
class _Losses:
    """Negative log-likelihood of each row's target tokens, summed, and how many tokens each has."""

    sums: list[float]
    tokens: list[int]

    def per_token(self) -> float:
        return sum(self.sums) / max(sum(self.tokens), 1)

    def per_row(self) -> list[float]:
        return [s / max(n, 1) for s, n in zip(self.sums, self.tokens, strict=True)]


# Decoding a hold-out stops this many tokens past its longest output, if no end token came first.
DECODE_MARGIN = 8


def _decode(
    backbone: Backbone, prompt: torch.Tensor | None, validation: list[Example], template: str, cap: int
) -> list[str]:
    """Greedy outputs, batched by the engine's scheduler, inputs cut from the left as training cuts them."""
    texts = [render(template, ex.input) for ex in validation]
    longest = max(
        len(target_ids(backbone, t, ex.output, with_eos=False))
        for t, ex in zip(texts, validation, strict=True)
    )
    options = {"max_new_tokens": min(cap, longest + DECODE_MARGIN), "temperature": 0.0, "truncate": True}
    return [g.text.strip() for g in generate(backbone, prompts=[prompt] * len(texts), texts=texts, **options)]


def _loss_pass(
    backbone: Backbone,
    prompt: torch.Tensor | None,
    validation: list[Example],
    template: str,
    batch_size: int,
    append_eos: bool,
) -> _Losses:
    k = virtual_tokens(prompt)
    encoded = _encode(backbone, validation, template, k, append_eos=append_eos)
    sums: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            log_probs, row_of = target_log_probs(
                backbone, [prompt] * len(chunk), [e.context for e in chunk], [e.target for e in chunk]
            )
            per_row = torch.zeros(len(chunk), device=log_probs.device).index_add_(0, row_of, -log_probs)
            sums += per_row.tolist()
    return _Losses(sums, [len(e.target) for e in encoded])


def _label_pass(
    backbone: Backbone,
    prompt: torch.Tensor | None,
    validation: list[Example],
    template: str,
    labels: list[str],
    batch_size: int,
) -> tuple[_Losses, list[str]]:
    """The true labels' losses (meaningful when every output is a label) and the predictions."""
    losses, predicted = _Losses([], []), []
    for start in range(0, len(validation), batch_size):
        chunk = validation[start : start + batch_size]
        texts = [render(template, ex.input) for ex in chunk]
        scores = label_log_likelihoods(backbone, prompts=[prompt] * len(chunk), texts=texts, labels=labels)
        for row, ex, text in zip(scores, chunk, texts, strict=True):
            predicted.append(labels[int(row.argmax())])
            known = ex.output in labels
            losses.sums.append(-float(row[labels.index(ex.output)]) if known else 0.0)
            losses.tokens.append(len(target_ids(backbone, text, ex.output, with_eos=False)) if known else 0)
    return losses, predicted


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
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
) -> TrainResult:
    """Tune ``prompt`` ([k, d] or a prefix [2, L, H_kv, k, Dh]) on ``train``; the same seed and data give
    the same prompt, and so does a run resumed from any of its checkpoints (handed to ``on_checkpoint``
    every ``checkpoint_every`` steps). Three parts: the run's state (started, or resumed), the steps, and
    the final choice among the best prompt evaluated, the start and the bare template."""
    encoded = _encode(
        backbone,
        train,
        template,
        virtual_tokens(prompt),
        append_eos=config.append_eos,
        labels=labels if config.label_loss and not config.append_eos else None,
    )
    metric = config.metric(classification=bool(labels))

    def run_eval(current: torch.Tensor | None) -> dict:
        return evaluate(
            backbone,
            current,
            validation,
            template=template,
            labels=labels,
            batch_size=config.batch_size,
            append_eos=config.append_eos,
            decode_tokens=0 if labels else config.decode_tokens,
            rows_by=metric,
        )

    state = _TuningState.begin(backbone, prompt, config, metric, resume, examples=len(encoded))
    stopped, early = _run_steps(
        state,
        backbone,
        encoded,
        config,
        run_eval=run_eval if validation else None,
        on_progress=on_progress,
        should_stop=should_stop,
        on_checkpoint=on_checkpoint,
    )
    kept, metrics, versus_bare = state.best.prompt, {}, None
    if kept is None:
        kept = state.param.detach()
    if not stopped:
        kept, metrics, versus_bare = _final_choice(state, prompt, run_eval, bool(validation), early=early)
    metrics.pop(ROWS_KEY, None)
    window = state.losses[-LOSS_WINDOW:]
    metrics = {
        "train_loss": sum(window) / len(window) if window else None,
        "val_loss": None,
        "val_accuracy": None,
        **metrics,
    }
    return TrainResult(
        prompt=kept.float().cpu().clone(),  # as the prompt
        metrics=metrics,
        steps_done=len(state.losses),
        stopped=stopped,
        state=state.snapshot() if stopped else None,
        versus_bare=versus_bare,
    )


@dataclass
class _TuningState:
    """What a run carries from step to step, all of which a checkpoint saves: the prompt being learned
    (float32 even on a bfloat16 backbone: the updates are small), the optimiser, the batch order, the
    losses so far and the best prompt evaluated."""

    param: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    batches: BatchOrder
    best: _Best
    losses: list[float]

    @classmethod
    def begin(
        cls,
        backbone: Backbone,
        prompt: torch.Tensor,
        config: TrainConfig,
        metric: EvalMetric,
        resume: Checkpoint | None,
        *,
        examples: int,
    ) -> _TuningState:
        start = prompt if resume is None else resume.prompt
        param = torch.nn.Parameter(start.detach().to(backbone.device, torch.float32).clone())  # as the prompt
        batches = BatchOrder(config.batch_size, examples, config.seed)
        state = cls(param, make_optimizer(param, config), batches, _Best(metric), [])
        if resume is not None:
            state.optimizer.load_state_dict(resume.optimizer)
            state.batches.generator.set_state(resume.batch_rng)
            state.batches.pending = list(resume.pending)
            state.losses = list(resume.losses)
            state.best.restore(resume)
        return state

    def snapshot(self) -> Checkpoint:
        return Checkpoint(
            step=len(self.losses),
            prompt=self.param.detach().cpu().clone(),
            optimizer=_detached(self.optimizer.state_dict()),
            batch_rng=self.batches.generator.get_state(),
            pending=list(self.batches.pending),
            losses=list(self.losses),
            **self.best.state(),
        )


def _run_steps(
    state: _TuningState,
    backbone: Backbone,
    encoded: list,
    config: TrainConfig,
    *,
    run_eval: Callable[[torch.Tensor | None], dict] | None,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
    on_checkpoint: Callable[[Checkpoint], None] | None,
) -> tuple[bool, bool]:
    """The optimiser's steps from where ``state`` is to config.steps, evaluating every eval_every steps
    (``run_eval``: None without a hold-out). Returns (stopped by should_stop, stopped early: patience)."""
    first, started = len(state.losses), time.monotonic()
    for step in range(first, config.steps):
        if should_stop():
            return True, False
        for group in state.optimizer.param_groups:  # set, not stepped: a resumed run needs no scheduler
            group["lr"] = config.learning_rate * lr_factor(step, config)
        with _autocast(backbone):
            loss = _loss(backbone, state.param, [encoded[i] for i in state.batches.next()])
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([state.param], config.max_grad_norm)
        state.optimizer.step()
        state.losses.append(loss.item())
        done = step + 1
        eta = (time.monotonic() - started) / (done - first) * (config.steps - done)
        on_progress(Progress(done, config.steps, state.losses[-1], eta))
        if config.eval_every and done % config.eval_every == 0 and done < config.steps and run_eval:
            metrics = run_eval(state.param.detach())
            shown = {k: v for k, v in metrics.items() if k != ROWS_KEY}
            log.info("step %d/%d: %s", done, config.steps, shown)
            state.best.offer(done, state.param, metrics)
            if config.patience and state.best.evaluations_since_best >= config.patience:
                return False, True
        every = config.checkpoint_every
        if on_checkpoint and every and done % every == 0 and done < config.steps:
            on_checkpoint(state.snapshot())
    return False, False


def _final_choice(
    state: _TuningState,
    start: torch.Tensor,
    run_eval: Callable[[torch.Tensor | None], dict],
    validated: bool,
    *,
    early: bool,
) -> tuple[torch.Tensor, dict, Comparison | None]:
    """The prompt a finished run keeps (the best evaluated, the last one included unless it stopped
    early), its metrics, and how it compares with the bare template on the hold-out (None without one)."""
    best, param = state.best, state.param
    if not early:
        best.offer(len(state.losses), param, run_eval(param.detach()))
    kept = best.prompt if best.prompt is not None else param.detach()
    if validated and ROWS_KEY not in best.metrics:  # resumed from a checkpoint without row scores
        best.metrics = {**best.metrics, **run_eval(kept)}
    metrics = {**best.metrics, "best_step": best.step, "stopped_early": early}
    if not validated:
        return kept, metrics, None
    bare = run_eval(None)
    versus_bare = compare(best.metrics[ROWS_KEY], bare[ROWS_KEY], best.metric)
    if versus_bare.worse:
        # The start (also when the run resumed) is the fallback, scored only when the trained prompt would
        # be refused: a generation hold-out takes minutes to decode. It is not a rival in every job: on a
        # few dozen rows an untrained label-word prompt can win a one-row draw and then score far below
        # both elsewhere (docs/benchmarks.md, "Small data").
        initial = run_eval(start.detach())
        if best.key(initial) > best.key(best.metrics):
            kept, metrics = start.detach(), {**initial, "best_step": 0, "stopped_early": early}
            versus_bare = compare(initial[ROWS_KEY], bare[ROWS_KEY], best.metric)
    metrics.update(_bare(bare), eval_metric=best.metric.value, zero_shot_test=versus_bare.as_metrics())
    return kept, metrics, versus_bare


def _bare(zero_shot: dict) -> dict:
    """The bare template's hold-out figures, named as a job's metrics name them (zero_shot_...)."""
    return {
        bare_key(m): zero_shot[tuned_key(m)] for m in EvalMetric if zero_shot.get(tuned_key(m)) is not None
    }


def _detached(state: dict) -> dict:
    """A copy of an optimizer's state_dict: its tensors are the live ones, which later steps update."""
    return {
        "state": {
            pid: {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for pid, s in state["state"].items()
        },
        "param_groups": copy.deepcopy(state["param_groups"]),
    }


def make_optimizer(param: torch.nn.Parameter, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW([param], lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        # torch's Adafactor takes the learning rate as given (no relative step size), so the same schedule
        # applies; Lester et al. tuned prompts with Adafactor at 0.3.
        return torch.optim.Adafactor([param], lr=config.learning_rate, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def _autocast(backbone: Backbone):
    """bfloat16 matmuls on CUDA (the prompt itself stays float32); float32 on CPU, where bfloat16 is slow."""
    if backbone.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Best:
    """The best prompt evaluated so far by the job's metric (the validation loss breaks ties)."""

    def __init__(self, metric: EvalMetric):
        self.metric = metric
        self.prompt: torch.Tensor | None = None
        self.metrics: dict = {}
        self.step = 0
        self.evaluations_since_best = 0

    def offer(self, step: int, param: torch.Tensor, metrics: dict) -> None:
        if metrics.get("val_loss") is None:
            return
        if self.prompt is None or self.key(metrics) > self.key(self.metrics):
            self.prompt, self.metrics, self.step = param.detach().clone(), metrics, step
            self.evaluations_since_best = 0
        else:
            self.evaluations_since_best += 1

    def state(self) -> dict:
        prompt = None if self.prompt is None else self.prompt.float().cpu().clone()
        return {
            "best_step": self.step,
            "best_prompt": prompt,
            "best_metrics": self.metrics,
            "evaluations_since_best": self.evaluations_since_best,
        }

    def restore(self, checkpoint: Checkpoint) -> None:
        self.step, self.metrics = checkpoint.best_step, checkpoint.best_metrics
        self.prompt = checkpoint.best_prompt
        self.evaluations_since_best = checkpoint.evaluations_since_best

    def key(self, metrics: dict) -> tuple[float, float]:
        return rank(metrics, self.metric)
