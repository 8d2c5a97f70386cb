"""Fairness between tenants: one tenant flooding inference does not slow another one down.

    .venv/bin/python bench/fairness.py           # about 2 minutes on 2 cores, after the API has started

`softprompt api` runs on a fresh registry with two tenants, a and b, and a limit of --limit inference
requests per second per tenant. Tenant A sends --requests generations open-loop at --a-rps (each at its
scheduled time, whatever the earlier ones are doing), first alone ("unloaded"), then while tenant B sends
the same kind of request at 4 x --limit per second for the whole phase ("loaded"). Prints A's requests,
successes and nearest-rank p50/p99 latency in each phase, how B's requests were answered (200, 429 with or
without Retry-After, other), and A's loaded/unloaded p99 ratio (target <= 2) with A's failures (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import start_api  # noqa: E402

PYTHON = str(ROOT / ".venv/bin/python")
INPUTS = [
    "The weather today is",
    "My favourite food is",
    "A good book should",
    "The train to the city",
    "Every morning I",
    "The best way to learn is",
]


@dataclass
class Reply:
    status: int | str  # an HTTP status, or the name of the exception when none came back
    seconds: float
    retry_after: bool


def log(message: str) -> None:
    print(message, flush=True)


def cli(env: dict, *args: str) -> str:
    done = subprocess.run([PYTHON, "-m", "app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`softprompt {' '.join(args)}` failed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def client(url: str, key: str) -> httpx.AsyncClient:
    # Generous limits: an open-loop client must never wait for a free connection or time out early.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    return httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300, limits=limits
    )


async def send(http: httpx.AsyncClient, at: float, index: int, new_tokens: int) -> Reply:
    """One generation sent at loop time ``at``. The latency counts from then, not from when the request
    left, so a late start (a busy client) shows up as latency instead of hiding."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, at - loop.time()))
    body = {"task": None, "input": INPUTS[index % len(INPUTS)], "max_new_tokens": new_tokens}
    try:
        response = await http.post("/v1/generate", json=body)
    except httpx.HTTPError as error:
        return Reply(type(error).__name__, loop.time() - at, False)
    return Reply(response.status_code, loop.time() - at, "retry-after" in response.headers)


async def open_loop(http: httpx.AsyncClient, count: int, rps: float, new_tokens: int) -> list[Reply]:
    start = asyncio.get_running_loop().time() + 0.1
    return await asyncio.gather(*(send(http, start + i / rps, i, new_tokens) for i in range(count)))


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(name: str, replies: list[Reply]) -> tuple[float, int]:
    """Prints A's line for one phase; returns (p99 seconds, failures)."""
    seconds = [r.seconds for r in replies]
    ok = sum(r.status == 200 for r in replies)
    p50, p99 = nearest_rank(seconds, 0.50), nearest_rank(seconds, 0.99)
    log(f"{name:<19} {len(replies)} requests, {ok} ok, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    return p99, len(replies) - ok


def flood_line(replies: list[Reply], rps: float, limit: int) -> str:
    ok = sum(r.status == 200 for r in replies)
    refused = [r for r in replies if r.status == 429]
    other = len(replies) - ok - len(refused)
    missing = sum(not r.retry_after for r in refused)
    header = "all with Retry-After" if missing == 0 else f"{missing} WITHOUT Retry-After"
    return (
        f"tenant B flooding at {rps:g} req/s (limit {limit}): {ok} ok, {len(refused)} refused with 429 "
        f"({header}), {other} other"
    )


async def measure(url: str, keys: dict[str, str], args: argparse.Namespace) -> None:
    n, a_rps, flood_rps = args.requests, args.a_rps, 4 * args.limit
    async with client(url, keys["a"]) as a, client(url, keys["b"]) as b:
        # Warm-up, one at a time and under the limit; then a pause so that its requests leave A's window.
        for i in range(args.warmup):
            await send(a, asyncio.get_running_loop().time(), i, args.max_new_tokens)
        await asyncio.sleep(1.5)

        unloaded = await open_loop(a, n, a_rps, args.max_new_tokens)
        await asyncio.sleep(1.5)
        # B covers A's whole schedule, from A's first request to its last.
        flood_count = math.ceil(n / a_rps * flood_rps)
        loaded, flood = await asyncio.gather(
            open_loop(a, n, a_rps, args.max_new_tokens),
            open_loop(b, flood_count, flood_rps, args.max_new_tokens),
        )

    p99_unloaded, _ = summary("tenant A unloaded:", unloaded)
    log(flood_line(flood, flood_rps, args.limit))
    p99_loaded, failures = summary("tenant A loaded:", loaded)
    log(
        f"A's p99 loaded / unloaded = {p99_loaded / p99_unloaded:.2f}   (target <= 2); "
        f"A's failures: {failures} (target 0)"
    )
    statuses = sorted({str(r.status) for r in loaded + flood if r.status not in (200, 429)})
    if statuses:
        log(f"other statuses seen: {', '.join(statuses)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5, help="inference requests per second per tenant")
    parser.add_argument("--requests", type=int, default=100, help="tenant A's requests per phase")
    parser.add_argument("--a-rps", type=float, default=2.0, help="tenant A's requests per second")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests as A before the phases")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument(
        "--b-limit", type=int, help="tenant B's own limit (default: --limit); B still floods at 4 x --limit"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="softprompt-fairness-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_TENANT_INFERENCE_RPS": str(args.limit),
            "SOFTPROMPT_REAPER_INTERVAL_S": "0",
        }
        cli(env, "db", "upgrade")
        keys = {tenant: cli(env, "keys", "create", "--tenant", tenant) for tenant in ("a", "b")}
        if args.b_limit is not None:  # B's own limit, e.g. 0: every flood request refused, none served
            cli(env, "tenants", "quota", "b", "--inference-rps", str(args.b_limit))
        log(
            f"limit {args.limit} req/s per tenant; A: {args.requests} requests per phase at "
            f"{args.a_rps:g}/s; B: {4 * args.limit} req/s; {args.max_new_tokens} new tokens each"
        )
        server = start_api(env, args.port, Path(data_dir) / "api.log", timeout=600)  # first run converts
        try:
            asyncio.run(measure(f"http://127.0.0.1:{args.port}", keys, args))
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
