from __future__ import annotations

import pytest
import torch

from app.ml.batching import context_ids, target_ids, target_log_probs
from app.ml.soft_prompt import init_prompt
from app.ml.text import render
from app.ml.trainer import Example, TrainConfig, evaluate, train_prompt

TEMPLATE = "Review: {input}\nSentiment:"
LABELS = ["positive", "negative"]
POSITIVE = ["great", "wonderful", "fun", "good", "moving", "beautiful"]
NEGATIVE = ["dull", "boring", "bad", "tedious", "lifeless", "awful"]


def _examples() -> list[Example]:
    """The label is the input's word: trivially learnable by a prompt."""
    return [Example(f"a {w} film", "positive") for w in POSITIVE] + [
        Example(f"a {w} film", "negative") for w in NEGATIVE
    ]


def _train(backbone, steps: int, seed: int = 0, should_stop=lambda: False, progress=None):
    prompt = init_prompt(backbone, num_virtual_tokens=8, strategy="random", seed=3)
    data = _examples()
    return train_prompt(
        backbone,
        prompt=prompt,
        train=data,
        validation=data,
        template=TEMPLATE,
        labels=LABELS,
        config=TrainConfig(steps=steps, batch_size=6, learning_rate=0.1, warmup_steps=2, seed=seed),
        on_progress=(progress if progress is not None else lambda p: None),
        should_stop=should_stop,
    )


def test_training_lowers_the_loss_and_raises_accuracy_without_touching_the_backbone(tiny_backbone):
    before = {name: p.detach().clone() for name, p in tiny_backbone.model.state_dict().items()}
    untrained = _train(tiny_backbone, steps=0)
    seen = []
    trained = _train(tiny_backbone, steps=40, progress=seen.append)
    assert trained.steps_done == 40 and not trained.stopped
    assert [p.step for p in seen] == list(range(1, 41))
    assert seen[-1].eta_seconds == 0
    assert trained.metrics["val_loss"] < untrained.metrics["val_loss"] * 0.7
    assert trained.metrics["train_loss"] < seen[0].loss
    assert trained.metrics["val_accuracy"] >= max(0.9, untrained.metrics["val_accuracy"])
    assert trained.prompt.shape == (8, 64) and trained.prompt.dtype == torch.float32
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_same_seed_same_prompt(tiny_backbone):
    first = _train(tiny_backbone, steps=5, seed=1)
    assert torch.equal(first.prompt, _train(tiny_backbone, steps=5, seed=1).prompt)
    assert not torch.equal(first.prompt, _train(tiny_backbone, steps=5, seed=2).prompt)


def test_should_stop_ends_training_early(tiny_backbone):
    seen = []
    result = _train(tiny_backbone, steps=50, should_stop=lambda: len(seen) >= 3, progress=seen.append)
    assert result.stopped
    assert result.steps_done == 3 == len(seen)


def test_without_eos_the_loss_covers_the_label_tokens_only(tiny_backbone):
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1)
    data = _examples()
    with_eos = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=None, append_eos=True)
    without = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=None, append_eos=False)
    contexts = [context_ids(tiny_backbone, render(TEMPLATE, ex.input)) for ex in data]
    targets = [
        target_ids(tiny_backbone, render(TEMPLATE, ex.input), ex.output, with_eos=False) for ex in data
    ]
    with torch.inference_mode():
        log_probs, _ = target_log_probs(tiny_backbone, [prompt] * len(data), contexts, targets)
    assert without["val_loss"] == pytest.approx(-log_probs.mean().item(), rel=1e-5)
    assert with_eos["val_loss"] != pytest.approx(without["val_loss"], rel=1e-3)
