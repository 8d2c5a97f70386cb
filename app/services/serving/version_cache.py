"""The path of a version from the registry to the engine, in tiers, each bounded and counted:

    the registry (the database)
      -> names: a task's name ("sst2") to its newest version (entries bounded), kept while the registry's
         mark is unchanged; the mark is read at most once per task_resolve_ttl_s, whatever the load
      -> prompts: decoded soft prompts on the CPU (PromptTensors, bounded in bytes)
      -> keys_values: the keys and values the engine attends to (app/ml/prompt_kv.py, bounded in bytes)

A cold version's first request pays one load, shared by every request for it that arrives meanwhile
(SingleFlight): a burst of requests for a version nobody asked for in a while makes one database read,
not one each. Each tier reports hits, misses, loads, evictions, bytes held and load times to the
CacheObserver (the API's /metrics)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import TypeVar

import torch

from app.ml.prompt_kv import CacheObserver, report_load

T = TypeVar("T")

NAMES = "names"
PROMPTS = "prompts"


class PromptTensors:
    """Decoded prompt tensors by (version id, checksum), least recently used first out, bounded by bytes."""

    def __init__(self, max_bytes: int, observer: CacheObserver | None = None):
        self.max_bytes = max_bytes
        self.observer = observer
        self._entries: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: tuple[int, str]) -> torch.Tensor | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if self.observer is not None:
            self.observer.cache_counted(PROMPTS, "miss" if found is None else "hit")
        return found

    def put(self, key: tuple[int, str], prompt: torch.Tensor, *, load_seconds: float) -> None:
        evictions = 0
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = prompt
            self._bytes += prompt.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                evictions += 1
            held = self._bytes
        report_load(self.observer, PROMPTS, seconds=load_seconds, evictions=evictions, held=held)


class SingleFlight:
    """One load per key at a time: a caller that asks for a key already being loaded waits for that load
    and shares its result (or its error) instead of starting its own."""

    def __init__(self) -> None:
        self._loading: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def run(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            pending = self._loading.get(key)
            leader = pending is None
            if leader:
                pending = self._loading[key] = Future()
        if not leader:
            return pending.result()
        try:
            result = load()
        except BaseException as error:
            pending.set_exception(error)
            raise
        else:
            pending.set_result(result)
            return result
        finally:
            with self._lock:
                del self._loading[key]


class RegistryMark:
    """The registry's change mark (``read``, one small query), read again at most once per ``ttl_s``: what a
    name resolved to stays valid while the mark it was resolved under is current. So resolving names costs
    one query per ``ttl_s`` for the whole server, not one per name, and a new version is seen within
    ``ttl_s``."""

    def __init__(self, read: Callable[[], Hashable], ttl_s: float):
        self._read = read
        self._ttl_s = ttl_s
        self._mark: Hashable | None = None
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def current(self) -> Hashable:
        with self._lock:  # one reader at a time; the others wait for its mark rather than read their own
            now = time.monotonic()
            if now - self._read_at >= self._ttl_s:
                self._mark, self._read_at = self._read(), now
            return self._mark
