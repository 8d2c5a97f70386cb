"""The engine's running batch: rows of different tasks, each with its own soft prompt, advanced together one
token per decoder call.

Layout of row i in the cache, left-padded so every row's newest entry is the last column:

    [padding][prompt i's k_i entries][padding][input i's n_i tokens][generated tokens]

A prompt-tuned row whose prompt's keys and values no cache holds yet runs its k_i virtual tokens as the
first columns of its own input instead (InlinePrompt): [padding][prompt i's k_i vectors, input i's n_i
tokens][generated tokens]. Its keys and values come out of that prefill, with no pass of their own.

Padding may sit in the middle: the attention mask hides it, and positions count only real entries (the
prompt at 0..k_i-1, the input from k_i on), so a row computes exactly what it would alone and unpadded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.ml.backbone import Backbone
from app.ml.layout import additive_mask
from app.ml.prompt_kv import PromptKV
from app.ml.row import GenerationRequest, Row


@dataclass
class DecodeBatch:
    rows: list[Row]
    cache: DynamicCache  # per layer: keys and values [B, H_kv, T, Dh]
    attention_mask: torch.Tensor  # [B, T] long: 1 for prompt, input and generated entries, 0 for padding
    next_positions: torch.Tensor  # [B] long: position id of the token each row feeds next
    next_tokens: torch.Tensor  # [B] long: that token (the row's latest choice)

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, keep: list[int]) -> DecodeBatch | None:
        """The batch with only rows ``keep``, and the leading columns that became all padding dropped."""
        if not keep:
            return None
        index = torch.tensor(keep, device=self.attention_mask.device)
        mask = self.attention_mask[index]  # [B', T]
        first = int(mask.any(0).to(torch.int8).argmax())  # first column some remaining row uses
        keys = [layer.keys[index, :, first:] for layer in self.cache.layers]
        values = [layer.values[index, :, first:] for layer in self.cache.layers]
        return DecodeBatch(
            rows=[self.rows[i] for i in keep],
            cache=_cache_from(keys, values),
            attention_mask=mask[:, first:],
            next_positions=self.next_positions[index],
            next_tokens=self.next_tokens[index],
        )

    @staticmethod
    def concatenate(a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
        """One batch holding the rows of both; the shorter one is left-padded to the other's width."""
        width = max(a.attention_mask.shape[1], b.attention_mask.shape[1])

        def widen(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            pad = width - t.shape[-dim_from_end]
            return torch.nn.functional.pad(t, (0, 0) * (dim_from_end - 1) + (pad, 0)) if pad else t

        keys = [
            torch.cat([widen(la.keys, 2), widen(lb.keys, 2)])
            for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
        ]
        values = [
            torch.cat([widen(la.values, 2), widen(lb.values, 2)])
            for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
        ]
        return DecodeBatch(
            rows=a.rows + b.rows,
            cache=_cache_from(keys, values),
            attention_mask=torch.cat([widen(a.attention_mask, 1), widen(b.attention_mask, 1)]),
            next_positions=torch.cat([a.next_positions, b.next_positions]),
            next_tokens=torch.cat([a.next_tokens, b.next_tokens]),
        )


def _cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))


@dataclass(frozen=True)
class InlinePrompt:
    """A prompt-tuned row's virtual tokens ([k, d]), run in the row's prefill before its input."""

    embeds: torch.Tensor


@dataclass
class Prefill:
    """New rows' inputs being run on top of their prompts' shared keys and values, all at once or a few
    columns at a time (chunked prefill: a long input's prefill, cut into pieces that take turns with the
    running rows' decoder steps). A chunk's queries see the cache built so far plus themselves, so the keys,
    values and logits are those of one prefill of the whole input."""

    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [B, K + N] long: 1 for prompt and input entries, 0 for padding
    positions: torch.Tensor  # [B, N] long: position id of each input column
    ids: torch.Tensor  # [B, N] long: the inputs, left-padded
    prompt_columns: int  # K: the longest prompt's entries, the cache's first columns
    # row -> (its first prompt column among the input columns, the prompt's vectors [k, d] backbone dtype)
    inline: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    done: int = 0  # input columns run so far
    started: float = field(default_factory=time.perf_counter)

    @property
    def columns(self) -> int:
        return self.ids.shape[1]

    def run(self, backbone: Backbone, columns: int | None = None) -> torch.Tensor | None:
        """Run the next ``columns`` input columns (None: all that are left). Returns the logits for each
        row's first new token ([B, V] float32) once the last column has run, else None."""
        model, k = backbone.model, self.prompt_columns
        start = self.done
        end = self.columns if columns is None else min(self.columns, start + columns)
        # Query i (cache column k + start + i) sees the real entries up to itself.
        causal = torch.ones(end - start, k + end, dtype=torch.bool, device=self.mask.device).tril(k + start)
        allowed = self.mask[:, : k + end].bool()[:, None, None] & causal  # [B, 1, q, K + end]
        hidden = model.get_decoder()(
            inputs_embeds=self._embeds(model, start, end),  # [B, q, d]
            attention_mask=additive_mask(allowed, backbone.dtype),
            position_ids=self.positions[:, start:end],
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state  # [B, q, d]
        self.done = end
        return backbone.logits(hidden[:, -1]) if end == self.columns else None  # [B, V]

    def _embeds(self, model, start: int, end: int) -> torch.Tensor:
        """Input columns start..end-1 embedded, with the inline prompts' vectors in their columns."""
        embeds = model.get_input_embeddings()(self.ids[:, start:end])  # [B, q, d]
        for row, (first, vectors) in self.inline.items():
            lo, hi = max(start, first), min(end, first + len(vectors))
            if lo < hi:
                embeds[row, lo - start : hi - start] = vectors[lo - first : hi - first]
        return embeds

    def inline_prompt_kvs(self) -> dict[int, PromptKV]:
        """Once every column has run: the keys and values the inline prompts left in the cache, by row,
        copied out so they outlive the batch."""
        found = {}
        for row, (first, vectors) in self.inline.items():
            columns = slice(self.prompt_columns + first, self.prompt_columns + first + len(vectors))
            keys = torch.stack(
                [layer.keys[row, :, columns] for layer in self.cache.layers]
            )  # [L, H_kv, k, Dh]
            values = torch.stack([layer.values[row, :, columns] for layer in self.cache.layers])
            found[row] = PromptKV(keys, values)
        return found

    def batch(self) -> DecodeBatch:
        """The rows, ready to decode, once every column has run."""
        return DecodeBatch(
            rows=list(self.rows),
            cache=self.cache,
            attention_mask=self.mask,
            next_positions=self.positions[:, -1] + 1,
            next_tokens=torch.zeros(len(self.rows), dtype=torch.long, device=self.mask.device),
        )


def start_prefill(
    backbone: Backbone,
    rows: list[Row],
    prompt_kv: Callable[[GenerationRequest], PromptKV | InlinePrompt | None],
) -> Prefill:
    """The new rows laid out on top of their prompts' keys and values (or their inline prompts ahead of
    their inputs), no input column run yet."""
    device, dtype = backbone.device, backbone.dtype
    found = [prompt_kv(r.request) for r in rows]
    kvs = [kv if isinstance(kv, PromptKV) else None for kv in found]
    inlined = [len(kv.embeds) if isinstance(kv, InlinePrompt) else 0 for kv in found]
    contexts = [r.request.context for r in rows]
    batch_size = len(rows)
    k_max = max((kv.length for kv in kvs if kv is not None), default=0)
    n_max = max(len(c) + k for c, k in zip(contexts, inlined, strict=True))
    inline = {}

    mask = torch.zeros(batch_size, k_max + n_max, dtype=torch.long, device=device)  # [B, K + N]
    positions = torch.zeros(batch_size, n_max, dtype=torch.long, device=device)  # [B, N]
    ids = torch.zeros(batch_size, n_max, dtype=torch.long, device=device)  # [B, N]
    cache = DynamicCache()  # plain layers: one built from the config may slide and drop entries
    if k_max:
        layers, heads, _, head_dim = next(kv.keys.shape for kv in kvs if kv is not None)
        prefix_keys = torch.zeros(layers, batch_size, heads, k_max, head_dim, dtype=dtype, device=device)
        prefix_values = torch.zeros_like(prefix_keys)  # [L, B, H_kv, K, Dh]
    for row, (kv, context, k_inline) in enumerate(zip(kvs, contexts, inlined, strict=True)):
        k, n = (0 if kv is None else kv.length), len(context)
        if k:
            prefix_keys[:, row, :, k_max - k :] = kv.keys
            prefix_values[:, row, :, k_max - k :] = kv.values
            mask[row, k_max - k : k_max] = 1
        if k_inline:  # the prompt's vectors as the row's first input columns, at positions 0..k-1
            first = n_max - n - k_inline
            inline[row] = (first, found[row].embeds.to(device, dtype))
            mask[row, k_max + first : k_max + n_max - n] = 1
            positions[row, first : n_max - n] = torch.arange(k_inline, device=device)
            k = k_inline
        mask[row, k_max + n_max - n :] = 1
        positions[row, n_max - n :] = torch.arange(k, k + n, device=device)
        ids[row, n_max - n :] = torch.tensor(context, dtype=torch.long, device=device)
    if k_max:
        cache = _cache_from(list(prefix_keys.unbind(0)), list(prefix_values.unbind(0)))
    return Prefill(
        rows=list(rows),
        cache=cache,
        mask=mask,
        positions=positions,
        ids=ids,
        prompt_columns=k_max,
        inline=inline,
    )


def prefill(
    backbone: Backbone,
    rows: list[Row],
    prompt_kv: Callable[[GenerationRequest], PromptKV | InlinePrompt | None],
) -> tuple[DecodeBatch, torch.Tensor]:
    """Run the new rows' inputs on top of their prompts' shared keys and values, in one piece.

    Returns the batch, ready to decode, and the logits for each row's first new token ([B, V] float32).
    """
    pending = start_prefill(backbone, rows, prompt_kv)
    logits = pending.run(backbone)
    return pending.batch(), logits


def decode_step(backbone: Backbone, batch: DecodeBatch) -> torch.Tensor:
    """Feed every row its next token; the batch's cache, mask and positions advance in place.
    Returns the logits for the token after it ([B, V] float32)."""
    model = backbone.model
    batch.attention_mask = torch.cat(
        [batch.attention_mask, batch.attention_mask.new_ones(len(batch), 1)], dim=1
    )  # [B, T + 1]
    hidden = model.get_decoder()(
        inputs_embeds=model.get_input_embeddings()(batch.next_tokens[:, None]),  # [B, 1, d]
        attention_mask=additive_mask(batch.attention_mask.bool()[:, None, None], backbone.dtype),  # [B,1,1,T]
        position_ids=batch.next_positions[:, None],
        cache=batch.cache,
        use_cache=True,
    ).last_hidden_state  # [B, 1, d]
    batch.next_positions = batch.next_positions + 1
    return backbone.logits(hidden[:, -1])  # [B, V]
