"""A soft prompt's keys and values, computed once and shared by every request of its task.

The prompt sits at positions 0..k-1 of every row that uses it and, attention being causal, its entries see
only each other: their keys and values in every layer are the same whatever input follows. Running those k
positions once per prompt version, instead of once per request, is the work prompt tuning lets a server
share."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from app.ml.backbone import Backbone
from app.ml.soft_prompt import is_prefix


class CacheObserver(Protocol):
    """What a cache of versions reports (the API turns it into metrics), by tier: "names" (a task's name to
    its version), "prompts" (decoded soft prompts), "keys_values" (this module's PromptKV). Events are
    "hit", "miss", "load" and "eviction"."""

    def cache_counted(self, tier: str, event: str, count: int = 1) -> None: ...

    def cache_loaded(self, tier: str, seconds: float) -> None: ...

    def cache_holds(self, tier: str, nbytes: int) -> None: ...


KEYS_VALUES = "keys_values"


def report_load(
    observer: CacheObserver | None, tier: str, *, seconds: float, evictions: int, held: int | None
) -> None:
    """What one load into a tier changed: the load and its time, the entries it pushed out, the bytes
    the tier holds now (None: a tier not bounded in bytes)."""
    if observer is None:
        return
    observer.cache_counted(tier, "load")
    observer.cache_loaded(tier, seconds)
    if evictions:
        observer.cache_counted(tier, "eviction", evictions)
    if held is not None:
        observer.cache_holds(tier, held)


@dataclass(frozen=True)
class PromptKV:
    keys: torch.Tensor  # [L, H_kv, k, Dh] backbone dtype, rotary embedding already applied
    values: torch.Tensor  # [L, H_kv, k, Dh]

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def compute_prompt_kv(backbone: Backbone, prompt: torch.Tensor) -> PromptKV:
    """Run the k prompt vectors ([k, d]) alone through the decoder at positions 0..k-1. A prefix
    ([2, L, H_kv, k, Dh]) already is keys and values: it is only moved to the backbone's device and dtype."""
    if is_prefix(prompt):
        keys, values = prompt.detach().to(backbone.device, backbone.dtype).unbind(0)
        return PromptKV(keys.contiguous(), values.contiguous())
    embeds = prompt.to(backbone.device, backbone.dtype)[None]  # [1, k, d]
    positions = torch.arange(len(prompt), device=backbone.device)[None]  # [1, k]
    cache = DynamicCache()  # plain layers: one built from the config may slide and drop entries
    with torch.inference_mode():
        backbone.model.get_decoder()(
            inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True
        )
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H_kv, k, Dh]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return PromptKV(keys, values)


def compute_prompt_kvs(backbone: Backbone, prompts: list[torch.Tensor]) -> list[PromptKV]:
    """``compute_prompt_kv`` for several prompts, those of one length in one pass: a pass reads every weight
    of the backbone whatever its rows, so eight cold prompts cost about one pass, not eight."""
    found: list[PromptKV | None] = [None] * len(prompts)
    lengths: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if is_prefix(prompt) or len(prompt) == 0:
            found[i] = compute_prompt_kv(backbone, prompt)
        else:
            lengths.setdefault(len(prompt), []).append(i)
    for k, members in lengths.items():
        embeds = torch.stack([prompts[i] for i in members]).to(backbone.device, backbone.dtype)  # [B, k, d]
        positions = torch.arange(k, device=backbone.device)[None].expand(len(members), k)  # [B, k]
        cache = DynamicCache()
        with torch.inference_mode():
            backbone.model.get_decoder()(
                inputs_embeds=embeds, position_ids=positions, cache=cache, use_cache=True
            )
        for row, i in enumerate(members):
            keys = torch.stack([layer.keys[row] for layer in cache.layers])  # [L, H_kv, k, Dh]
            values = torch.stack([layer.values[row] for layer in cache.layers])
            found[i] = PromptKV(keys, values)
    return found


class PromptKVCache:
    """LRU of PromptKV bounded by bytes. Keys must name immutable content (a version's id and checksum),
    so an entry never goes stale; a new version is a new key."""

    def __init__(self, backbone: Backbone, max_bytes: int, observer: CacheObserver | None = None):
        self.backbone = backbone
        self.max_bytes = max_bytes
        self.observer = observer
        self._entries: OrderedDict[Hashable, PromptKV] = OrderedDict()
        self._bytes = 0
        self._evicted = 0  # bytes dropped since take_evicted_bytes() last asked
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def holds(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def warm(self, items: list[tuple[Hashable, torch.Tensor]]) -> None:
        """Compute and keep the keys and values of ``items`` (key, prompt) not held yet, together, in passes
        of their own (compute_prompt_kvs), each counted as a miss."""
        with self._lock:
            cold = {key: prompt for key, prompt in items if key not in self._entries}
        if not cold:
            return
        started = time.perf_counter()
        computed = compute_prompt_kvs(self.backbone, list(cold.values()))
        seconds = (time.perf_counter() - started) / len(cold)
        for key, kv in zip(cold, computed, strict=True):
            self._count("miss")
            self.keep(key, kv, seconds)

    def lookup(self, key: Hashable) -> PromptKV | None:
        """The entry for ``key``, counted as a hit or a miss; None when not held."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        self._count("miss" if found is None else "hit")
        return found

    def get(self, key: Hashable, prompt: torch.Tensor) -> PromptKV:
        """The entry for ``key``, computed from ``prompt`` in a pass of its own and kept when not held."""
        found = self.lookup(key)
        if found is not None:
            return found
        started = time.perf_counter()
        kv = compute_prompt_kv(self.backbone, prompt)
        self.keep(key, kv, time.perf_counter() - started)
        return kv

    def keep(self, key: Hashable, kv: PromptKV, seconds: float) -> None:
        """Hold ``kv`` for ``key`` (``seconds``: what computing it cost), the least recently used out past
        the bound."""
        evictions = 0
        with self._lock:
            if key not in self._entries:
                self._entries[key] = kv
                self._bytes += kv.nbytes
            # The entry just used stays even when it alone is over the bound: the batch needs it now.
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evicted += evicted.nbytes
                evictions += 1
            held = self._bytes
        report_load(self.observer, KEYS_VALUES, seconds=seconds, evictions=evictions, held=held)

    def _count(self, event: str) -> None:
        if self.observer is not None:
            self.observer.cache_counted(KEYS_VALUES, event)

    def take_evicted_bytes(self) -> int:
        """Bytes evicted since the last call: memory the process freed, which it may not have returned."""
        with self._lock:
            evicted, self._evicted = self._evicted, 0
            return evicted
