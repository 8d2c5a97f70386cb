"""Batched generation and rank classification where every row carries its own soft prompt (or none)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.errors import InvalidRequest
from app.ml.backbone import Backbone
from app.ml.batching import build_batch, context_ids, fit_context, target_ids, target_log_probs


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int  # completion tokens, the end-of-sequence token not counted
    prompt_tokens: int  # input tokens, virtual tokens not counted
    token_ids: list[int] = field(default_factory=list)  # the completion tokens themselves


def _virtual(prompt: torch.Tensor | None) -> int:
    return 0 if prompt is None else len(prompt)


def _next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """[B, V] float32 logits -> [B] token ids."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest head whose mass reaches top_p; the top token always survives.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # Sampled on CPU so a seed gives the same text on any device.
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def generate(
    backbone: Backbone,
    *,
    prompts: list[torch.Tensor | None],
    texts: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> list[Generation]:
    """Continue each rendered text, all rows in one KV-cached batch. Inputs longer than the window allows
    (with the prompt and ``max_new_tokens``) are refused with InvalidRequest."""
    model, tokenizer, eos = backbone.model, backbone.tokenizer, backbone.eos_token_id
    if not texts:
        return []
    contexts = [
        fit_context(backbone, context_ids(backbone, text), _virtual(p) + max_new_tokens, truncate=False)
        for p, text in zip(prompts, texts, strict=True)
    ]
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    if max_new_tokens < 1:
        return [Generation("", "length", 0, len(c) if t else 0) for c, t in zip(contexts, texts, strict=True)]
    stops = [s for s in stop or [] if s]
    results: list[Generation | None] = [None] * len(texts)
    produced: list[list[int]] = [[] for _ in texts]
    with torch.inference_mode():
        # Left padding puts every row's last real entry in the last column, so one cache step serves all.
        batch = build_batch(backbone, prompts, contexts, left_pad=True)
        mask = batch.attention_mask  # [B, T]
        positions = batch.position_ids[:, -1:]  # [B, 1]
        cache = DynamicCache(config=model.config)  # filled in place by each forward
        out = model.get_decoder()(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=mask,
            position_ids=batch.position_ids,
            cache=cache,
            use_cache=True,
        )
        for _ in range(max_new_tokens):
            logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()  # [B, V]
            chosen = _next_tokens(logits, temperature, top_p, generator)  # [B]
            for i, token in enumerate(chosen.tolist()):
                if results[i] is None:
                    results[i] = _advance(
                        tokenizer,
                        produced[i],
                        token,
                        eos,
                        stops,
                        max_new_tokens,
                        len(contexts[i]) if texts[i] else 0,
                    )
            if all(r is not None for r in results):
                break
            # Finished rows keep decoding garbage that nobody reads; dropping them from the batch would
            # mean slicing the cache, which is the scheduler's job later.
            mask = torch.cat([mask, mask.new_ones(len(texts), 1)], dim=1)  # [B, T + step]
            positions = positions + 1  # [B, 1]
            out = model.get_decoder()(
                inputs_embeds=model.get_input_embeddings()(chosen[:, None]),
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
    return [r for r in results if r is not None]


def _advance(
    tokenizer, ids: list[int], token: int, eos: int, stops: list[str], limit: int, prompt_tokens: int
) -> Generation | None:
    """Append ``token`` to a row's completion; its Generation once the row is done, else None."""
    if token == eos:
        return Generation(
            tokenizer.decode(ids, skip_special_tokens=True), "stop", len(ids), prompt_tokens, list(ids)
        )
    ids.append(token)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return Generation(text[: min(hits)], "stop", len(ids), prompt_tokens, list(ids))
    if len(ids) >= limit:
        return Generation(text, "length", len(ids), prompt_tokens, list(ids))
    return None


def generate_reference(
    backbone: Backbone, *, prompt: torch.Tensor | None, text: str, max_new_tokens: int
) -> list[int]:
    """Greedy completion ids (without the end token) recomputing the whole sequence at every step, with
    no padding and no cache: slow, obviously right, and what the tests hold ``generate`` to."""
    model, eos = backbone.model, backbone.eos_token_id
    ids = context_ids(backbone, text)
    produced: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            batch = build_batch(backbone, [prompt], [ids + produced], left_pad=False)
            hidden = model.get_decoder()(inputs_embeds=batch.inputs_embeds, use_cache=False).last_hidden_state
            token = int(model.get_output_embeddings()(hidden[0, -1]).argmax())
            if token == eos:
                break
            produced.append(token)
    return produced


def label_log_likelihoods(
    backbone: Backbone, *, prompts: list[torch.Tensor | None], texts: list[str], labels: list[str]
) -> torch.Tensor:
    """log P(label tokens | prompt, rendered text), summed over the label's tokens: [rows, labels] float32.
    Every (row, label) pair is one row of a single padded forward."""
    if not labels:
        raise InvalidRequest("classification needs at least one label", param="labels")
    pair_prompts, contexts, targets = [], [], []
    for prompt, text in zip(prompts, texts, strict=True):
        label_ids = [target_ids(backbone, text, label, with_eos=False) for label in labels]
        longest = max(len(t) for t in label_ids)
        context = fit_context(
            backbone, context_ids(backbone, text), _virtual(prompt) + longest, truncate=False
        )
        for ids in label_ids:
            pair_prompts.append(prompt)
            contexts.append(context)
            targets.append(ids)
    with torch.inference_mode():
        log_probs, row_of = target_log_probs(backbone, pair_prompts, contexts, targets)  # [N], [N]
        sums = torch.zeros(len(targets), device=log_probs.device).index_add(0, row_of, log_probs)
    return sums.view(len(texts), len(labels)).cpu()


def classify(
    backbone: Backbone, *, prompts: list[torch.Tensor | None], texts: list[str], labels: list[str]
) -> list[dict[str, float]]:
    """Rank classification: a softmax over the labels' summed log-likelihoods, one {label: p} per row."""
    probs = label_log_likelihoods(backbone, prompts=prompts, texts=texts, labels=labels).softmax(-1)
    return [dict(zip(labels, row, strict=True)) for row in probs.tolist()]
