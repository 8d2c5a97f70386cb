"""Backbones a team brings (a local Hugging Face directory in SOFTPROMPT_BACKBONES), one tiny random model
per decoder family: both methods train on each, and a batch mixing a prompt-tuned version, a prefix version
and the bare backbone, served through the engine's keys-and-values cache, greedily gives exactly what the
no-cache reference gives. A family that cannot work is refused when it loads."""

from __future__ import annotations

import pytest
import torch

from app.contract.kinds import Method
from app.errors import InvalidRequest, UnsupportedBackbone
from app.ml.backbone import load_backbone, materialize_backbone
from app.ml.engine import Scheduler
from app.ml.inference import classify, generate, generate_reference, generation_requests
from app.ml.prefix import init_prefix
from app.ml.prompt_kv import PromptKVCache
from app.ml.row import Row
from app.ml.soft_prompt import init_prompt, prompt_from_bytes, prompt_to_bytes, stored_shape
from app.ml.trainer import Example, TrainConfig, train_prompt
from tests.fixtures.tiny_backbone import (
    FAMILIES,
    SLIDING_WINDOW,
    UNSUPPORTED_FAMILIES,
    write_tiny_family,
)
from tests.ml.rows import input_text

TEMPLATE = "Review: {input}\nSentiment:"
LABELS = ["positive", "negative"]
TRAIN = [Example(input_text(i), LABELS[i % 2]) for i in range(8)]


def _configured(tmp_path, family: str):
    """The family's model as the service loads a configured backbone directory."""
    directory = write_tiny_family(tmp_path / family, family)
    path = materialize_backbone(family, str(directory), tmp_path / "converted")
    return load_backbone(family, path, device="cpu")


def _tuned(backbone, prompt: torch.Tensor) -> torch.Tensor:
    config = TrainConfig(
        steps=3, batch_size=4, learning_rate=0.05, max_grad_norm=1.0, seed=0, optimizer="adamw"
    )
    result = train_prompt(
        backbone,
        prompt=prompt,
        train=TRAIN,
        validation=TRAIN[:4],
        template=TEMPLATE,
        labels=LABELS,
        config=config,
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    assert result.steps_done == 3 and not torch.equal(result.prompt, prompt)
    return result.prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_both_methods_and_serves_them_mixed_exactly(tmp_path, family):
    backbone = _configured(tmp_path, family)
    prompt = _tuned(backbone, init_prompt(backbone, num_virtual_tokens=4, strategy="labels", labels=LABELS))
    prefix = _tuned(
        backbone, init_prefix(backbone, num_virtual_tokens=5, strategy="random", labels=LABELS, seed=1)
    )
    # A version is stored and read back at the shape this backbone's keys and values have.
    for method, tensor in ((Method.PROMPT, prompt), (Method.PREFIX, prefix)):
        stored = prompt_from_bytes(prompt_to_bytes(tensor), shape=stored_shape(backbone, method))
        assert torch.equal(stored, tensor)

    # Long and short inputs in one batch: padding puts a short row's prefix far from its input.
    versions = [prompt, prefix, None, prefix, prompt, None]
    texts = [TEMPLATE.format(input=input_text(i)) for i in (0, 18, 5, 1, 13, 2)]
    cache = PromptKVCache(backbone, max_bytes=1 << 24)
    scheduler = Scheduler(backbone, max_batch_rows=len(texts), prompt_kv_cache=cache)
    keys = [None if v is None else ("version", id(v)) for v in versions]
    requests = generation_requests(
        backbone, prompts=versions, texts=texts, max_new_tokens=6, prompt_keys=keys
    )
    rows = [Row(request=r) for r in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    while not scheduler.idle:
        scheduler.step()
    for row, version, text in zip(rows, versions, texts, strict=True):
        reference = generate_reference(backbone, prompt=version, text=text, max_new_tokens=6)
        assert row.result().token_ids == reference

    mixed = classify(backbone, prompts=versions, texts=texts, labels=LABELS)
    for version, text, scores in zip(versions, texts, mixed, strict=True):
        assert scores == pytest.approx(
            classify(backbone, prompts=[version], texts=[text], labels=LABELS)[0], abs=1e-5
        )


def test_a_sliding_window_backbone_serves_rows_padded_past_its_window_exactly(tmp_path):
    """Each row fits in the window, but a long row pads a short one's prefix further from its newest
    token than the window: attention still reaches the whole row, as in the reference."""
    backbone = _configured(tmp_path, "mistral-sliding")
    assert backbone.max_length == SLIDING_WINDOW  # not the 512 positions it was built with
    prefix = init_prefix(backbone, num_virtual_tokens=6, strategy="random", seed=3)
    long = "the cast is wonderful and the story moves on and on and the cast is wonderful and"  # 17 tokens
    versions, texts = [None, prefix], [long, "a"]
    generated = generate(backbone, prompts=versions, texts=texts, max_new_tokens=4)
    assert sum(len(g.token_ids) for g in generated) == 8
    for version, text, got in zip(versions, texts, generated, strict=True):
        assert got.token_ids == generate_reference(backbone, prompt=version, text=text, max_new_tokens=4)
    with pytest.raises(InvalidRequest, match="fit"):
        generation_requests(backbone, prompts=[None], texts=[long + " " + long], max_new_tokens=4)


@pytest.mark.parametrize("family", UNSUPPORTED_FAMILIES)
def test_a_family_that_cannot_work_is_refused_when_it_loads(tmp_path, family):
    with pytest.raises(UnsupportedBackbone, match=rf"backbone '{family}': "):
        _configured(tmp_path, family)
