from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from app.errors import InvalidRequest, PromptCorrupt
from app.ml import prompt_kv
from app.ml.inference import classify, generate, generate_reference, label_log_likelihoods, label_scores
from app.ml.layout import context_ids, target_ids
from app.ml.prefix import init_prefix
from app.ml.row import _sample
from tests.ml.rows import input_text, random_prompt

LABELS = ["positive", "negative", "not sure"]
# Each of these is one token after an input: classification takes its one-forward-per-row path.
ONE_TOKEN_LABELS = ["positive", "negative"]
LABEL_SETS = pytest.mark.parametrize("labels", [LABELS, ONE_TOKEN_LABELS], ids=["multi-token", "one-token"])


def _rows(n: int) -> tuple[list[torch.Tensor | None], list[str]]:
    """n rows with different prompt lengths (every fifth bare) and inputs of different lengths."""
    prompts = [None if i % 5 == 2 else random_prompt(3 + i, seed=i) for i in range(n)]
    texts = [input_text(i) for i in range(n)]
    return prompts, texts


def test_batched_greedy_equals_single_rows_and_uncached_reference(tiny_backbone):
    prompts, texts = _rows(16)
    batched = generate(tiny_backbone, prompts=prompts, texts=texts, max_new_tokens=12)
    for prompt, text, got in zip(prompts, texts, batched, strict=True):
        alone = generate(tiny_backbone, prompts=[prompt], texts=[text], max_new_tokens=12)[0]
        reference = generate_reference(tiny_backbone, prompt=prompt, text=text, max_new_tokens=12)
        assert got.token_ids == alone.token_ids == reference
        assert got.text == alone.text
        assert got.tokens == len(reference)
        assert got.input_tokens == len(context_ids(tiny_backbone, text))


def test_rows_that_share_a_prompt_compute_its_keys_and_values_once(tiny_backbone, monkeypatch):
    """An evaluation's batch: 24 rows of one prompt-tuned version. The prompt's keys and values are
    computed once for the call (a pass of their own: inline they would widen all 24 rows), and every row
    is what it is alone."""
    passes = []
    real = prompt_kv.compute_prompt_kvs
    monkeypatch.setattr(prompt_kv, "compute_prompt_kvs", lambda b, ps: passes.append(len(ps)) or real(b, ps))
    prompt, texts = random_prompt(8, 7), [input_text(i) for i in range(24)]
    results = generate(tiny_backbone, prompts=[prompt] * 24, texts=texts, max_new_tokens=3)
    assert passes == [1]
    for text, result in zip(texts, results, strict=True):
        assert result.token_ids == generate_reference(
            tiny_backbone, prompt=prompt, text=text, max_new_tokens=3
        )


def test_a_prompt_changes_the_output(tiny_backbone):
    bare, prompted = generate(
        tiny_backbone, prompts=[None, random_prompt(10, 1)], texts=["the film is"] * 2, max_new_tokens=8
    )
    assert bare.token_ids != prompted.token_ids


def test_length_finish(tiny_backbone):
    out = generate(tiny_backbone, prompts=[None], texts=["the film"], max_new_tokens=5)[0]
    assert (out.finish_reason, out.tokens, len(out.token_ids)) == ("length", 5, 5)


def test_stop_string_truncates_text_before_it(tiny_backbone):
    full = generate(tiny_backbone, prompts=[None], texts=["the plot"], max_new_tokens=10)[0]
    stop = full.text[3:5]
    assert stop.strip(), "the fixture model should produce visible text"
    out = generate(tiny_backbone, prompts=[None], texts=["the plot"], max_new_tokens=10, stop=[stop])[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert full.text.startswith(out.text)
    assert out.tokens <= full.tokens


def test_eos_ends_a_row_and_is_not_in_the_text(tiny_backbone):
    """The random model rarely emits its real end token, so declare its third greedy token the end."""
    free = generate_reference(tiny_backbone, prompt=None, text="the film is", max_new_tokens=6)
    tokenizer = copy.deepcopy(tiny_backbone.tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(free[2])
    backbone = dataclasses.replace(tiny_backbone, tokenizer=tokenizer)
    expected = free[: free.index(free[2])]
    out = generate(
        backbone, prompts=[None, random_prompt(4, 0)], texts=["the film is", "fun"], max_new_tokens=6
    )
    assert (
        out[0].token_ids
        == expected
        == generate_reference(backbone, prompt=None, text="the film is", max_new_tokens=6)
    )
    assert (out[0].finish_reason, out[0].tokens) == ("stop", len(expected))
    assert out[0].text == tokenizer.decode(expected)


def test_sampling_is_seeded(tiny_backbone):
    prompts, texts = _rows(4)
    kwargs = dict(prompts=prompts, texts=texts, max_new_tokens=8, temperature=1.0, top_p=0.9)
    first = generate(tiny_backbone, seed=7, **kwargs)
    again = generate(tiny_backbone, seed=7, **kwargs)
    other = generate(tiny_backbone, seed=8, **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_degenerate_requests(tiny_backbone):
    assert generate(tiny_backbone, prompts=[], texts=[], max_new_tokens=4) == []
    out = generate(tiny_backbone, prompts=[None], texts=["the film"], max_new_tokens=0)
    assert [(g.text, g.finish_reason, g.tokens) for g in out] == [("", "length", 0)]
    with pytest.raises(InvalidRequest):
        classify(tiny_backbone, prompts=[None], texts=["the film"], labels=[])


def test_too_long_input_is_refused(tiny_backbone):
    with pytest.raises(InvalidRequest):
        generate(tiny_backbone, prompts=[None], texts=["fun " * 600], max_new_tokens=4)


@LABEL_SETS
def test_classify_probabilities_sum_to_one_and_ignore_the_other_rows(tiny_backbone, labels):
    prompts, texts = _rows(6)
    together = classify(tiny_backbone, prompts=prompts, texts=texts, labels=labels)
    for prompt, text, scores in zip(prompts, texts, together, strict=True):
        assert set(scores) == set(labels)
        assert math.isclose(sum(scores.values()), 1.0, rel_tol=1e-5)
        alone = classify(tiny_backbone, prompts=[prompt], texts=[text], labels=labels)[0]
        for label in labels:
            assert scores[label] == pytest.approx(alone[label], abs=1e-5)


@LABEL_SETS
def test_label_log_likelihood_equals_a_direct_unpadded_computation(tiny_backbone, labels):
    backbone = tiny_backbone
    prompts, texts = _rows(4)
    lengths = {len(target_ids(backbone, t, label, with_eos=False)) for t in texts for label in labels}
    assert (lengths == {1}) == (labels == ONE_TOKEN_LABELS), "each label set must take its own path"
    scores = label_log_likelihoods(backbone, prompts=prompts, texts=texts, labels=labels)  # [4, labels]
    embed = backbone.model.get_input_embeddings()
    for r, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        context = context_ids(backbone, text)
        for c, label in enumerate(labels):
            label_ids = target_ids(backbone, text, label, with_eos=False)
            ids = torch.tensor(context + label_ids)
            rows = embed(ids) if prompt is None else torch.cat([prompt, embed(ids)])
            with torch.no_grad():
                logits = backbone.model(inputs_embeds=rows[None]).logits[0].log_softmax(-1)  # [n, V]
            offset = len(rows) - len(label_ids) - 1
            direct = sum(logits[offset + j, t].item() for j, t in enumerate(label_ids))
            assert scores[r, c].item() == pytest.approx(direct, abs=1e-4)


def test_a_vanishing_top_p_still_samples_the_most_likely_token():
    """top_p so small that float32 reads it as 0 keeps the top token instead of emptying the nucleus."""
    logits = torch.tensor([0.1, 3.0, 0.2, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert {_sample(logits, 1.0, 2.2e-309, generator) for _ in range(20)} == {1}


def test_a_vanishing_temperature_decodes_greedily(tiny_backbone):
    kwargs = dict(prompts=[None], texts=["a film"], max_new_tokens=4, top_p=1.0)
    vanishing = generate(tiny_backbone, temperature=5e-324, **kwargs)
    greedy = generate(tiny_backbone, temperature=0, **kwargs)
    assert [g.token_ids for g in vanishing] == [g.token_ids for g in greedy]


@LABEL_SETS
def test_scoring_in_small_chunks_gives_the_scores_of_one_pass(tiny_backbone, labels):
    """The engine scores a request a chunk at a time; how it is cut must not change any number."""
    prompts, texts = _rows(5)
    whole = label_log_likelihoods(tiny_backbone, prompts=prompts, texts=texts, labels=labels)
    steps = label_scores(tiny_backbone, prompts=prompts, texts=texts, labels=labels, chunk_tokens=8)
    chunks = 0
    while True:
        try:
            next(steps)
            chunks += 1
        except StopIteration as done:
            pieces = done.value
            break
    assert chunks >= 5  # every row, or every pair, is longer than 8 tokens: one chunk each at least
    assert torch.allclose(pieces, whole, atol=1e-5)


def test_a_prefix_of_extreme_values_is_refused_in_classification_not_scored_null(tiny_backbone):
    shape = init_prefix(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=0).shape
    with pytest.raises(PromptCorrupt) as refused:
        classify(tiny_backbone, prompts=[torch.full(shape, 3e38)], texts=["fun"], labels=["good", "bad"])
    assert "not finite" in refused.value.message
