"""Serving thousands of tasks from one backbone: a phase over 16 hot tasks against a phase whose task is drawn
by a Zipf law over all of them, through HTTP, on the real backbone.

    .venv/bin/python bench/many_tasks.py --versions 10000     # 5,000 prompts and 5,000 prefixes

The registry is seeded through the services (one task per version, as one task per customer would be):
prompts and prefixes of the default backbone's real shapes, each distinct (real token embeddings, or the
keys and values real tokens leave, moved by a little noise). Then `softprompt api` serves them and
--clients closed-loop clients send generations of --new-tokens tokens for --seconds per phase; the two
phases take turns --rounds times (this machine's speed drifts by 20-30 % over minutes, which one phase
after the other would read as a ratio), and each phase's figures sum its rounds. Printed:
tokens per second of each phase and their ratio (target: Zipf >= 0.9x hot), p50 and p99 latency, a cold
version's first request against a warm one (target: at most 50 ms more at p50), the API's resident
memory against its cache settings, `GET /v1/models` (one page; target under 100 ms), and the version
cache counters from /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.contract.kinds import Method  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.models import DEFAULT_TENANT, Tenant  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.ml.soft_prompt import prompt_to_bytes, virtual_tokens  # noqa: E402
from app.services.registry import prompts as prompts_service  # noqa: E402
from bench.fairness import log  # noqa: E402
from bench.serving import INPUTS, load, percentile, rss_bytes, start_api, task_prefixes, task_prompts  # noqa: E402

HOT = 16
ZIPF_S = 1.1


def seed(db_url: str, backbone, versions: int) -> list[str]:
    """``versions`` tasks t0..: even ones prompt-tuned, odd ones prefix-tuned; their names."""
    upgrade(db_url)
    bases = {Method.PROMPT: task_prompts(backbone, 16), Method.PREFIX: task_prefixes(backbone, 16)}
    generator = torch.Generator().manual_seed(0)
    names = []
    started = time.perf_counter()
    with session_scope(db_url) as session:
        owner = session.scalars(select(Tenant.id).where(Tenant.name == DEFAULT_TENANT)).one()
        for i in range(versions):
            method = Method.PROMPT if i % 2 == 0 else Method.PREFIX
            base = bases[method][(i // 2) % 16]
            tensor = base + 0.001 * base.abs().mean() * torch.randn(base.shape, generator=generator)
            vectors = prompt_to_bytes(tensor)
            name = f"t{i}"
            prompts_service.add_version(
                session,
                tenant_id=owner,
                name=name,
                vectors=vectors,
                base_model=backbone.name,
                num_virtual_tokens=virtual_tokens(tensor),
                embedding_dim=backbone.embedding_dim,
                template="{input}",
                labels=None,
                kind="generation",
                metrics={"sha256": hashlib.sha256(vectors).hexdigest()[:8]},
                method=method,
            )
            names.append(name)
            if i % 1000 == 999:
                session.flush()
    log(
        f"seeded {versions} versions ({versions // 2} prompts, {versions - versions // 2} prefixes) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return names


def zipf_draw(names: list[str], rng: random.Random):
    weights = [1 / (rank**ZIPF_S) for rank in range(1, len(names) + 1)]
    cumulative = list(itertools.accumulate(weights))
    order = names[:]
    rng.shuffle(order)  # which task is popular is not which was made first
    return lambda: rng.choices(order, cum_weights=cumulative)[0]


async def phase(url: str, draw, clients: int, seconds: float, new_tokens: int) -> tuple[float, list[float]]:
    """Closed-loop clients for ``seconds``: (tokens per second, latencies)."""
    latencies: list[float] = []
    tokens = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(index: int) -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                body = {"task": draw(), "input": INPUTS[index % len(INPUTS)], "max_new_tokens": new_tokens}
                started = time.perf_counter()
                response = await http.post("/v1/generate", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return tokens / (time.perf_counter() - started), latencies


async def cold_against_warm(url: str, names: list[str], count: int) -> tuple[list[float], list[float]]:
    """Each of ``count`` versions asked twice in a row, alone: (first latencies, second latencies)."""
    cold, warm = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for name in names[:count]:
            for into in (cold, warm):
                started = time.perf_counter()
                (await http.post("/v1/generate", json={"task": name, "input": "Hello", "max_new_tokens": 1}))
                into.append(time.perf_counter() - started)
    return cold, warm


def cache_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("softprompt_version_cache"):
            for sample in family.samples:
                if sample.name.endswith(("_total", "_bytes", "_count", "_sum")):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60, help="per phase, all its rounds together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--cold", type=int, default=20, help="versions whose first request is timed")
    parser.add_argument("--port", type=int, default=8768)
    args = parser.parse_args()

    settings = Settings(backbone_dir=ROOT / ".cache/backbones")
    backbone = load(settings)
    with tempfile.TemporaryDirectory(prefix="softprompt-many-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_TENANT_INFERENCE_RPS": "100000",
            "SOFTPROMPT_REAPER_INTERVAL_S": "0",
        }
        names = seed(Settings(data_dir=Path(data_dir)).registry_url, backbone, args.versions)
        del backbone
        server = start_api(env, args.port)
        url = f"http://127.0.0.1:{args.port}"
        served = Settings(data_dir=Path(data_dir))  # the API's, from the same environment
        try:
            for attempt in ("first", "second"):
                started = time.perf_counter()
                listed = httpx.get(f"{url}/v1/models", timeout=60)
                models_ms = (time.perf_counter() - started) * 1000
                page = listed.json()
                log(
                    f"GET /v1/models ({attempt} call): {models_ms:.0f} ms, {len(listed.content) / 1024:.0f} "
                    f"KiB, {len(page['data'])} models, has_more {page['has_more']} (target < 100 ms)"
                )
            rng = random.Random(0)
            cold_names = rng.sample(names[HOT:], args.cold)
            asyncio.run(phase(url, lambda: rng.choice(names[:HOT]), 4, 5, 1))  # warm-up
            cold, warm = asyncio.run(cold_against_warm(url, cold_names, args.cold))
            before = rss_bytes(server.pid)
            extra = statistics.median(cold) - statistics.median(warm)
            log(
                f"a cold version's first request: p50 {statistics.median(cold) * 1000:.0f} ms against "
                f"{statistics.median(warm) * 1000:.0f} ms warm: +{extra * 1000:.0f} ms (target <= 50 ms)"
            )
            draws = {"hot": lambda: rng.choice(names[:HOT]), "zipf": zipf_draw(names, rng)}
            rates: dict[str, list[float]] = {label: [] for label in draws}
            latencies: dict[str, list[float]] = {label: [] for label in draws}
            for round_ in range(args.rounds):
                for label, draw in draws.items():
                    seconds = args.seconds / args.rounds
                    rate, seen = asyncio.run(phase(url, draw, args.clients, seconds, args.new_tokens))
                    rates[label].append(rate)
                    latencies[label] += seen
                    log(f"round {round_ + 1}, {label}: {rate:.1f} tokens/s, {len(seen)} requests")
            rows = {label: statistics.mean(rates[label]) for label in draws}
            for label, rate in rows.items():
                seen = latencies[label]
                log(
                    f"{label}: {rate:.1f} tokens/s, {len(seen)} requests, p50 "
                    f"{percentile(seen, 0.5):.2f} s, p99 {percentile(seen, 0.99):.2f} s"
                )
            log(f"zipf / hot = {rows['zipf'] / rows['hot']:.2f} (target >= 0.9)")
            grown = rss_bytes(server.pid) - before
            caches = served.prompt_cache_bytes + served.prompt_kv_cache_bytes
            mib = {"prompts": served.prompt_cache_bytes / 2**20, "kv": served.prompt_kv_cache_bytes / 2**20}
            log(
                f"API resident memory grew {grown / 2**20:.0f} MiB over the two phases; the version caches' "
                f"bounds are {caches / 2**20:.0f} MiB in all (prompts {mib['prompts']:.0f}, keys and values "
                f"{mib['kv']:.0f}; target: within them plus 10 %)"
            )
            for name, value in cache_counters(url).items():
                log(f"  {name} {value:.0f}")
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
