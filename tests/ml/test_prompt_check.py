"""A soft prompt is checked before it can sit beside other tenants' rows: values on the backbone's own
scale, finite scores on a probe input."""

from __future__ import annotations

import pytest
import torch

from app.ml import prompt_check
from app.ml.prefix import init_prefix
from app.ml.prompt_check import prompt_fault
from app.ml.soft_prompt import init_prompt


@pytest.fixture
def prefix(tiny_backbone) -> torch.Tensor:
    return init_prefix(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=0)


def test_prompts_and_prefixes_as_training_starts_them_pass(tiny_backbone, prefix):
    for strategy in ("random", "vocab"):
        prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy=strategy, seed=0)
        assert prompt_fault(tiny_backbone, prompt) is None
    assert prompt_fault(tiny_backbone, prefix) is None
    assert prompt_fault(tiny_backbone, prefix * 50) is None  # far off, but on the backbone's scale


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_finite_but_extreme_values_are_refused_naming_the_scale(tiny_backbone, prefix, method):
    shape = prefix.shape if method == "prefix" else (4, tiny_backbone.embedding_dim)
    fault = prompt_fault(tiny_backbone, torch.full(shape, 3e38))
    own = "keys and values" if method == "prefix" else "input embeddings"
    assert fault.startswith("reaches 3e+38") and f"this backbone's own {own} reach" in fault
    assert prompt_fault(tiny_backbone, torch.full(shape, float("nan"))) == "contains NaN or infinite values"


def test_a_prefix_whose_scores_overflow_is_refused_by_the_probe(tiny_backbone, prefix, monkeypatch):
    monkeypatch.setattr(prompt_check, "MAX_SCALE", float("inf"))  # only the probe stands in the way
    fault = prompt_fault(tiny_backbone, torch.full_like(prefix, 3e38))
    assert fault == "gives the backbone scores that are not finite numbers on a probe input"
