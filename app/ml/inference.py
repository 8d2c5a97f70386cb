"""Batched generation and rank classification where every row carries its own soft prompt (or none)."""

from __future__ import annotations

from collections.abc import Generator, Hashable

import torch
from transformers import DynamicCache

from app.errors import InvalidRequest, PromptCorrupt
from app.ml.backbone import Backbone
from app.ml.decode_batch import prefill
from app.ml.engine import generate_all
from app.ml.layout import (
    build_batch,
    context_ids,
    fit_context,
    target_ids,
    target_log_probs,
    token_groups,
)
from app.ml.prompt_kv import PromptKV, PromptKVCache, compute_prompt_kv
from app.ml.row import UNDECODABLE, Generation, GenerationRequest, Row
from app.ml.soft_prompt import is_prefix, virtual_tokens


def generation_requests(
    backbone: Backbone,
    *,
    prompts: list[torch.Tensor | None],
    texts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    prompt_keys: list[Hashable | None] | None = None,
    tenant: Hashable | None = None,
    truncate: bool = False,
) -> list[GenerationRequest]:
    """One engine request per text. Inputs longer than the window allows (with the prompt and
    ``max_new_tokens``) are refused with InvalidRequest, or with ``truncate`` cut from the left. Row i
    samples with ``seed + i``, so a row's text does not depend on what it is batched with.
    Every row is served for ``tenant``."""
    keys = prompt_keys or [None] * len(texts)
    stops = tuple(s for s in stop or [] if s)
    requests = []
    for i, (p, text, key) in enumerate(zip(prompts, texts, keys, strict=True)):
        ids = context_ids(backbone, text)
        context = fit_context(backbone, ids, virtual_tokens(p) + max_new_tokens, truncate=truncate)
        request = GenerationRequest(
            context=context,
            prompt=p,
            prompt_key=key,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stops,
            seed=None if seed is None else seed + i,
            input_tokens=len(ids) if text else 0,
            tenant=tenant,
        )
        requests.append(request)
    return requests


def generate(
    backbone: Backbone, *, prompts: list[torch.Tensor | None], texts: list[str], **options
) -> list[Generation]:
    """Continue each rendered text, all rows batched by the engine's scheduler, in this thread. Rows given
    the same prompt tensor share its keys and values (keyed by the tensor, for this call)."""
    options.setdefault("prompt_keys", [None if p is None else ("call", id(p)) for p in prompts])
    requests = generation_requests(backbone, prompts=prompts, texts=texts, **options)
    if not requests:
        return []
    if requests[0].max_new_tokens < 1:
        return [Generation("", "length", 0, r.input_tokens) for r in requests]
    return [s.result() for s in generate_all(backbone, requests)]


def generate_reference(
    backbone: Backbone, *, prompt: torch.Tensor | None, text: str, max_new_tokens: int
) -> list[int]:
    """Greedy completion ids (without the end token) recomputing the whole sequence at every step, with
    no padding and no cache of our own: slow, obviously right, and what the tests hold ``generate`` to. A
    prefix is given to the backbone as its past keys and values, as PEFT's prefix tuning does."""
    model, eos = backbone.model, backbone.eos_token_id
    ids = context_ids(backbone, text)
    produced: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if prompt is not None and is_prefix(prompt):
                hidden = _with_prefix(backbone, prompt, ids + produced)
            else:
                batch = build_batch(backbone, [prompt], [ids + produced], left_pad=False)
                hidden = model.get_decoder()(inputs_embeds=batch.inputs_embeds, use_cache=False)
            hidden = hidden.last_hidden_state
            token = int(backbone.logits(hidden[0, -1]).argmax())
            if token == eos:
                break
            produced.append(token)
    return produced


def _with_prefix(backbone: Backbone, prefix: torch.Tensor, ids: list[int]):
    """The decoder's output for ``ids`` after a prefix's k positions, passed as past keys and values."""
    keys, values = prefix.to(backbone.device, backbone.dtype)  # each [L, H_kv, k, Dh]
    past = DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in zip(keys, values, strict=True)])
    k = virtual_tokens(prefix)
    return backbone.model.get_decoder()(
        input_ids=torch.tensor([ids], device=backbone.device),
        position_ids=torch.arange(k, k + len(ids), device=backbone.device)[None],
        attention_mask=torch.ones(1, k + len(ids), dtype=torch.long, device=backbone.device),
        cache=past,
        use_cache=True,
    )


# Offline scoring (a job's evaluation) runs at most this many tokens per forward pass, so a validation set
# with many or long labels is scored in pieces rather than in one pass that needs all their memory at once.
OFFLINE_CHUNK_TOKENS = 4096


def label_log_likelihoods(backbone: Backbone, **request) -> torch.Tensor:
    """log P(label tokens | prompt, rendered text), summed over the label's tokens: [rows, labels] float32.
    ``request``: as for ``label_scores``, which this runs to the end in this thread."""
    request.setdefault("chunk_tokens", OFFLINE_CHUNK_TOKENS)
    steps = label_scores(backbone, **request)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def label_scores(
    backbone: Backbone,
    *,
    prompts: list[torch.Tensor | None],
    texts: list[str],
    labels: list[str],
    chunk_tokens: int,
    prompt_keys: list[Hashable | None] | None = None,
    kv_cache: PromptKVCache | None = None,
) -> Generator[None, None, torch.Tensor]:
    """``label_log_likelihoods`` in chunks of at most ``chunk_tokens`` tokens (a longer row runs alone),
    yielding after each: the engine runs one chunk per turn, so other requests are served between them.

    When every label is one token (the usual case: " positive", " negative") a row's input runs once, on
    top of its prompt's shared keys and values, and the LM head runs at its last position only. Otherwise
    every (row, label) pair is one row, [prompt][input][label], packed end to end."""
    if not labels:
        raise InvalidRequest("classification needs at least one label", param="labels")
    label_ids = [[target_ids(backbone, text, label, with_eos=False) for label in labels] for text in texts]
    longest = max(len(ids) for row in label_ids for ids in row)
    contexts = [
        fit_context(backbone, context_ids(backbone, text), virtual_tokens(prompt) + longest, truncate=False)
        for prompt, text in zip(prompts, texts, strict=True)
    ]
    scores = torch.zeros(len(texts), len(labels))  # [rows, labels]
    if longest == 1:
        keys = prompt_keys or [None] * len(texts)
        for group in token_groups([len(c) for c in contexts], chunk_tokens):
            with torch.inference_mode():
                scores[group] = _single_token_scores(
                    backbone,
                    [prompts[i] for i in group],
                    [keys[i] for i in group],
                    [contexts[i] for i in group],
                    [label_ids[i] for i in group],
                    kv_cache,
                )
            yield
        return scores
    pairs = [(row, column) for row in range(len(texts)) for column in range(len(labels))]
    sizes = [
        virtual_tokens(prompts[row]) + len(contexts[row]) + len(label_ids[row][column])
        for row, column in pairs
    ]
    for group in token_groups(sizes, chunk_tokens):
        chosen = [pairs[i] for i in group]
        with torch.inference_mode():
            log_probs, row_of = target_log_probs(
                backbone,
                [prompts[row] for row, _ in chosen],
                [contexts[row] for row, _ in chosen],
                [label_ids[row][column] for row, column in chosen],
            )  # [N], [N]
            sums = torch.zeros(len(chosen), device=log_probs.device).index_add(0, row_of, log_probs)
        for (row, column), total in zip(chosen, sums.cpu().tolist(), strict=True):
            scores[row, column] = total
        yield
    return scores


def _single_token_scores(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    keys: list[Hashable | None],
    contexts: list[list[int]],
    label_ids: list[list[list[int]]],
    kv_cache: PromptKVCache | None,
) -> torch.Tensor:
    computed: dict[int, PromptKV] = {}  # without a shared cache, still once per prompt in this call

    def prompt_kv(request: GenerationRequest) -> PromptKV | None:
        if request.prompt is None:
            return None
        if kv_cache is not None and request.prompt_key is not None:
            return kv_cache.get(request.prompt_key, request.prompt)
        if id(request.prompt) not in computed:
            computed[id(request.prompt)] = compute_prompt_kv(backbone, request.prompt)
        return computed[id(request.prompt)]

    rows = [
        Row(GenerationRequest(context=c, prompt=p, prompt_key=k, max_new_tokens=0))
        for p, k, c in zip(prompts, keys, contexts, strict=True)
    ]
    _, logits = prefill(backbone, rows, prompt_kv)  # [B, V]: the next-token logits after each input
    wanted = torch.tensor([[ids[0] for ids in row] for row in label_ids], device=logits.device)  # [B, labels]
    return logits.log_softmax(-1).gather(1, wanted).cpu()


def classify(backbone: Backbone, *, labels: list[str], **request) -> list[dict[str, float]]:
    """Rank classification: a softmax over the labels' summed log-likelihoods, one {label: p} per row.
    ``request``: as for ``label_scores``."""
    return probabilities(labels, label_log_likelihoods(backbone, labels=labels, **request))


def classify_steps(backbone: Backbone, *, labels: list[str], **request) -> Generator[None, None, list[dict]]:
    """``classify`` in chunks, for the engine: yields between chunks, returns the probabilities."""
    scores = yield from label_scores(backbone, labels=labels, **request)
    return probabilities(labels, scores)


def probabilities(labels: list[str], scores: torch.Tensor) -> list[dict[str, float]]:
    """A softmax per row; PromptCorrupt when a soft prompt of extreme values made the scores not finite
    (which would otherwise answer null probabilities)."""
    if not torch.isfinite(scores).all():
        raise PromptCorrupt(UNDECODABLE)
    return [dict(zip(labels, row, strict=True)) for row in scores.softmax(-1).tolist()]
