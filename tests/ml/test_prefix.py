"""Prefixes (deep prompts) served and scored: exactly the backbone with the prefix as its past keys and
values, alone and batched with prompt-tuned and bare rows."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from app.ml.engine import Scheduler
from app.ml.inference import (
    classify,
    generate,
    generate_reference,
    generation_requests,
    label_log_likelihoods,
)
from app.ml.layout import context_ids, target_ids
from app.ml.prefix import init_prefix
from app.ml.prompt_kv import PromptKVCache
from app.ml.row import Row
from app.ml.soft_prompt import init_prompt, is_prefix, virtual_tokens
from tests.ml.rows import input_text, random_prompt

LABELS = ["positive", "negative", "not sure"]
ONE_TOKEN_LABELS = ["positive", "negative"]


def _prefix(backbone, k: int, seed: int) -> torch.Tensor:
    return init_prefix(backbone, num_virtual_tokens=k, strategy="random", seed=seed)


def _mixed_rows(backbone, n: int) -> tuple[list[torch.Tensor | None], list[str]]:
    """Prefixes, prompts and bare rows in turn, of different lengths, with inputs of different lengths."""
    kinds = [
        lambda i: _prefix(backbone, 2 + i, seed=i),
        lambda i: random_prompt(3 + i, seed=i),
        lambda i: None,
    ]
    return [kinds[i % 3](i) for i in range(n)], [input_text(i) for i in range(n)]


def test_a_prefix_has_the_backbones_shape_and_counts_its_virtual_tokens(tiny_backbone):
    prefix = _prefix(tiny_backbone, 5, seed=0)
    config = tiny_backbone.model.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert prefix.shape == (2, config.num_hidden_layers, heads, 5, head_dim)
    assert is_prefix(prefix) and virtual_tokens(prefix) == 5
    assert not is_prefix(random_prompt(5, seed=0)) and virtual_tokens(random_prompt(5, seed=0)) == 5
    assert not init_prefix(tiny_backbone, num_virtual_tokens=5, strategy="zero").any()


def test_a_prefix_made_from_text_starts_where_prompt_tuning_from_that_text_starts(tiny_backbone):
    text = "a film review"
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=6, strategy="text", text=text)
    prefix = init_prefix(tiny_backbone, num_virtual_tokens=6, strategy="text", text=text)
    texts = [input_text(i) for i in range(4)]
    as_prompt = generate(tiny_backbone, prompts=[prompt] * 4, texts=texts, max_new_tokens=8)
    as_prefix = generate(tiny_backbone, prompts=[prefix] * 4, texts=texts, max_new_tokens=8)
    assert [g.token_ids for g in as_prefix] == [g.token_ids for g in as_prompt]
    scores_prompt = label_log_likelihoods(tiny_backbone, prompts=[prompt] * 4, texts=texts, labels=LABELS)
    scores_prefix = label_log_likelihoods(tiny_backbone, prompts=[prefix] * 4, texts=texts, labels=LABELS)
    assert torch.allclose(scores_prefix, scores_prompt, atol=1e-4)


def test_prefix_rows_generate_as_the_backbone_with_past_keys_and_values_alone_and_mixed(tiny_backbone):
    prompts, texts = _mixed_rows(tiny_backbone, 9)
    batched = generate(tiny_backbone, prompts=prompts, texts=texts, max_new_tokens=10)
    for prompt, text, got in zip(prompts, texts, batched, strict=True):
        alone = generate(tiny_backbone, prompts=[prompt], texts=[text], max_new_tokens=10)[0]
        reference = generate_reference(tiny_backbone, prompt=prompt, text=text, max_new_tokens=10)
        assert got.token_ids == alone.token_ids == reference


def test_a_prefix_changes_the_output(tiny_backbone):
    bare, prefixed = generate(
        tiny_backbone,
        prompts=[None, _prefix(tiny_backbone, 6, seed=1)],
        texts=["the film is"] * 2,
        max_new_tokens=8,
    )
    assert bare.token_ids != prefixed.token_ids


def test_the_engine_serves_prefix_rows_from_its_cache_exactly_and_holds_one_copy(tiny_backbone):
    """The serving path: rows name their version, so its keys and values come from the engine's cache,
    which holds a prefix once, at its own size."""
    prompts, texts = _mixed_rows(tiny_backbone, 6)
    cache = PromptKVCache(tiny_backbone, max_bytes=1 << 24)
    scheduler = Scheduler(tiny_backbone, max_batch_rows=4, prompt_kv_cache=cache)
    requests = generation_requests(
        tiny_backbone,
        prompts=prompts,
        texts=texts,
        max_new_tokens=6,
        prompt_keys=[None if p is None else ("version", i) for i, p in enumerate(prompts)],
    )
    rows = [Row(request=r) for r in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    while not scheduler.idle:
        scheduler.step()
    for row, prompt, text in zip(rows, prompts, texts, strict=True):
        assert row.result().token_ids == generate_reference(
            tiny_backbone, prompt=prompt, text=text, max_new_tokens=6
        )
    prefix = prompts[0]
    entry = cache.get(("version", 0), prefix)
    assert entry.nbytes == prefix.nbytes  # float32 backbone: the prefix's own tensors, no more


@pytest.mark.parametrize("labels", [LABELS, ONE_TOKEN_LABELS], ids=["multi-token", "one-token"])
def test_classification_with_prefixes_equals_a_direct_computation(tiny_backbone, labels):
    backbone = tiny_backbone
    prompts, texts = _mixed_rows(backbone, 6)
    scores = label_log_likelihoods(backbone, prompts=prompts, texts=texts, labels=labels)  # [6, labels]
    together = classify(backbone, prompts=prompts, texts=texts, labels=labels)
    for r, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        if prompt is None or not is_prefix(prompt):
            continue  # the other kinds have their own test (test_inference.py)
        context = context_ids(backbone, text)
        k = virtual_tokens(prompt)
        for c, label in enumerate(labels):
            label_ids = target_ids(backbone, text, label, with_eos=False)
            ids = context + label_ids
            keys, values = prompt  # each [L, H_kv, k, Dh]
            past = DynamicCache(
                ddp_cache_data=[(a[None], b[None]) for a, b in zip(keys, values, strict=True)]
            )
            with torch.no_grad():
                logits = (
                    backbone.model(
                        input_ids=torch.tensor([ids]),
                        position_ids=torch.arange(k, k + len(ids))[None],
                        attention_mask=torch.ones(1, k + len(ids), dtype=torch.long),
                        cache=past,
                    )
                    .logits[0]
                    .log_softmax(-1)
                )  # [n, V]
            offset = len(ids) - len(label_ids) - 1
            direct = sum(logits[offset + j, t].item() for j, t in enumerate(label_ids))
            assert scores[r, c].item() == pytest.approx(direct, abs=1e-4)
        alone = classify(backbone, prompts=[prompt], texts=[text], labels=labels)[0]
        assert together[r] == pytest.approx(alone, abs=1e-5)
