"""The API process's Prometheus metrics. Each app has its own registry, so several apps in one process (the
tests) never share counts."""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a quick classification to a long generation on a busy CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Seconds to load a version into a tier: a decode or a cached name is under a millisecond, a database read
# a few, the keys and values of a long prompt tens.
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


# The task label of the series past a process's cap of (tenant, task) pairs.
OTHER_TASKS = "_other"


class Metrics:
    def __init__(self, *, max_task_series: int = 1000) -> None:
        self.registry = CollectorRegistry()
        # Each (tenant, task) pair served makes a series per route: with thousands of tasks an uncapped
        # label set is an unbounded scrape. Past the cap, new pairs count under task OTHER_TASKS.
        self.max_task_series = max_task_series
        self._task_routes: dict[tuple[str, str], set[str]] = {}  # the series each pair has
        self._lock = threading.Lock()
        self.requests = Counter(
            "softprompt_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "softprompt_http_request_duration_seconds",
            "Time to answer an HTTP request (to its last byte for a stream).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "softprompt_inference_queue_seconds",
            "Time a generation row waited before joining the decoding batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "softprompt_engine_batch_rows",
            "Rows advanced together by one decoder step.",
            buckets=ROWS_BUCKETS,
            registry=self.registry,
        )
        self.step_time = Histogram(
            "softprompt_engine_step_seconds",
            "Time of one decoder step.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Per task: rate() of these gives inputs and generated tokens per second.
        self.inputs = Counter(
            "softprompt_inference_inputs",
            "Inputs served, by tenant, task (empty: the bare backbone) and route.",
            ["tenant", "task", "route"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "softprompt_generated_tokens",
            "Tokens generated, by tenant and task (empty: the bare backbone).",
            ["tenant", "task"],
            registry=self.registry,
        )

        # The tiers a version goes through (app/services/serving/version_cache.py).
        self.cache_events = Counter(
            "softprompt_version_cache_events",
            "Lookups and changes of the version tiers (names, prompts, keys_values), by event: hit, miss, "
            "load (one per miss that read or computed, shared by the requests that waited on it), eviction.",
            ["tier", "event"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "softprompt_version_cache_bytes",
            "Bytes a tier holds (prompts: decoded soft prompts; keys_values: their keys and values).",
            ["tier"],
            registry=self.registry,
        )
        self.cache_load_time = Histogram(
            "softprompt_version_cache_load_seconds",
            "Time to load a version into a tier.",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )

    # The version tiers' CacheObserver: called from worker threads and the engine thread.
    def cache_counted(self, tier: str, event: str, count: int = 1) -> None:
        self.cache_events.labels(tier, event).inc(count)

    def cache_loaded(self, tier: str, seconds: float) -> None:
        self.cache_load_time.labels(tier).observe(seconds)

    def cache_holds(self, tier: str, nbytes: int) -> None:
        self.cache_bytes.labels(tier).set(nbytes)

    # The engine's Observer: called on the engine thread.
    def admitted(self, waited_seconds: list[float]) -> None:
        for seconds in waited_seconds:
            self.queue_time.observe(seconds)

    def stepped(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.step_time.observe(seconds)

    def served(self, *, tenant: str, task: str | None, route: str, inputs: int, tokens: int) -> None:
        label = self._task_label(tenant, task or "", route)
        self.inputs.labels(tenant, label, route).inc(inputs)
        if tokens:
            self.tokens.labels(tenant, label).inc(tokens)

    def _task_label(self, tenant: str, task: str, route: str) -> str:
        with self._lock:
            routes = self._task_routes.get((tenant, task))
            if routes is None:
                if len(self._task_routes) >= self.max_task_series:
                    return OTHER_TASKS
                routes = self._task_routes[(tenant, task)] = set()
            routes.add(route)
            return task

    def forget_task(self, *, tenant: str, task: str) -> None:
        """Drop a deleted task's series, and its place under the cap."""
        with self._lock:
            routes = self._task_routes.pop((tenant, task), set())
        for route in routes:
            with contextlib.suppress(KeyError):
                self.inputs.remove(tenant, task, route)
        with contextlib.suppress(KeyError):
            self.tokens.remove(tenant, task)
