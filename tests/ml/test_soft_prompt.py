from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from app.errors import InvalidRequest, PromptCorrupt
from app.ml.backbone import encode
from app.ml.soft_prompt import init_prompt, prompt_from_bytes, prompt_to_bytes


def _table(backbone) -> torch.Tensor:
    return backbone.model.get_input_embeddings().weight.detach()


def test_bytes_round_trip_exactly():
    prompt = torch.randn(7, 64)
    restored = prompt_from_bytes(prompt_to_bytes(prompt), shape=(None, 64))
    assert restored.dtype == torch.float32
    assert torch.equal(restored, prompt)


@pytest.mark.parametrize(
    "data",
    [
        b"not a safetensors file",
        b"",
        save({"other": torch.zeros(2, 64)}),
        save({"prompt_embeddings": torch.zeros(2, 64), "extra": torch.zeros(1)}),
        save({"prompt_embeddings": torch.zeros(64)}),
        save({"prompt_embeddings": torch.zeros(2, 32)}),
        save({"prompt_embeddings": torch.zeros(0, 64)}),
        save({"prompt_embeddings": torch.zeros(2, 64, dtype=torch.float16)}),
        save({"prompt_embeddings": torch.tensor([[float("nan")] * 64])}),
        save({"prompt_embeddings": torch.tensor([[float("inf")] * 64])}),
    ],
    ids=[
        "garbage",
        "empty",
        "wrong-key",
        "extra-key",
        "rank-1",
        "wrong-width",
        "no-rows",
        "fp16",
        "nan",
        "inf",
    ],
)
def test_corrupt_bytes_raise_prompt_corrupt(data):
    with pytest.raises(PromptCorrupt):
        prompt_from_bytes(data, shape=(None, 64))


def test_text_init_repeats_the_text_embeddings(tiny_backbone):
    ids = encode(tiny_backbone, "great film")
    prompt = init_prompt(
        tiny_backbone, num_virtual_tokens=2 * len(ids) + 1, strategy="text", text="great film"
    )
    expected = _table(tiny_backbone)[(ids * 3)[: 2 * len(ids) + 1]]
    assert prompt.shape == (2 * len(ids) + 1, 64) and prompt.dtype == torch.float32
    assert torch.equal(prompt, expected)


def test_labels_init_cycles_the_label_token_embeddings(tiny_backbone):
    ids = encode(tiny_backbone, " positive") + encode(tiny_backbone, " negative")
    prompt = init_prompt(
        tiny_backbone, num_virtual_tokens=10, strategy="labels", labels=["positive", "negative"]
    )
    assert torch.equal(prompt, _table(tiny_backbone)[[ids[i % len(ids)] for i in range(10)]])


def test_vocab_init_takes_table_rows_and_is_seeded(tiny_backbone):
    first = init_prompt(tiny_backbone, num_virtual_tokens=6, strategy="vocab", seed=1)
    assert first.shape == (6, 64)
    assert all((row == _table(tiny_backbone)).all(-1).any() for row in first)
    assert torch.equal(first, init_prompt(tiny_backbone, num_virtual_tokens=6, strategy="vocab", seed=1))
    assert not torch.equal(first, init_prompt(tiny_backbone, num_virtual_tokens=6, strategy="vocab", seed=2))


def test_random_init_matches_the_table_scale(tiny_backbone):
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=200, strategy="random", seed=0)
    assert prompt.shape == (200, 64)
    assert prompt.std().item() == pytest.approx(_table(tiny_backbone).std().item(), rel=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strategy="text"),
        dict(strategy="text", text="  "),
        dict(strategy="labels"),
        dict(strategy="labels", labels=[]),
        dict(strategy="nonsense"),
        dict(strategy="random", num_virtual_tokens=0),
    ],
)
def test_bad_init_requests_are_refused(tiny_backbone, kwargs):
    kwargs = {"num_virtual_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequest) as info:
        init_prompt(tiny_backbone, **kwargs)
    assert info.value.param in ("init", "num_virtual_tokens")
