"""Where an HTTP generation's time goes outside the engine, and what a fuller batch buys on this machine.

    .venv/bin/python bench/http_profile.py                # about 6 minutes on 2 cores

In one run, on the real backbone, 16 tasks of 20 virtual tokens, chat inputs, --new-tokens each:

1. the bare backbone's `generate` at batch 16 (the reference of bench/serving.py (a));
2. the engine in-process, no HTTP, with the service's engine settings: --clients closed-loop callers for
   --seconds, at each of --batch-rows (SOFTPROMPT_ENGINE_MAX_BATCH_ROWS), to see whether more rows per
   step pay here, and how the engine's time splits between decoder steps and the rest (admissions'
   prefills, idle);
3. `softprompt api` over HTTP with the same callers and the same batch bound as the best in-process run,
   while py-spy samples every thread of the API process. Printed: tokens per second of each, and where the
   API's sampled time went, by thread (the engine's, the event loop's, the request threads') and by the
   parts of a request (parsing and validation, resolving the task, tokenising, JSON, the event loop's own
   work, waiting), and the engine's decoder-step share from /metrics.

py-spy comes from PyPI (`pip install py-spy`); it is not a dependency of the service.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.ml.engine import Engine  # noqa: E402
from app.ml.inference import generation_requests  # noqa: E402
from app.services.serving.serving import engine_from  # noqa: E402
from bench.many_tasks import phase  # noqa: E402
from bench.serving import (  # noqa: E402
    INPUTS,
    bare_generate,
    load,
    log,
    seed_registry,
    start_api,
    task_prompts,
)

# What a sampled stack is doing, by the first of these names found in it, most specific first.
PARTS = [
    ("forward passes (torch)", ("decode_step", "Prefill.run", "run (app/ml/decode_batch.py)", "forward")),
    ("choosing tokens, stop strings, detokenising", ("choose_tokens", "advance", "stream_delta")),
    ("the scheduler's own work", ("app/ml/engine.py",)),
    ("resolving the task", ("resolve_task", "resolve_model")),
    ("tokenising and checking inputs", ("render_inputs", "generation_requests", "tokenizer")),
    ("JSON and response models", ("jsonable_encoder", "serialize_response", "render (starlette", "dumps")),
    ("request parsing and validation", ("httptools", "validate_python", "solve_dependencies", "_get_body")),
    (
        "auth, quotas, metrics, middleware",
        ("auth.py", "quotas.py", "prometheus", "middleware", "api_metrics"),
    ),
    ("the event loop's own work", ("asyncio", "uvicorn", "anyio")),
]


def thread_kind(stack: str) -> str:
    if "app/ml/engine.py" in stack and "_loop" in stack:
        return "engine thread"
    if "run_forever" in stack:
        return "event loop"
    if "worker_thread" in stack or "_worker (" in stack or "anyio" in stack:
        return "request threads"
    return "other"


def part_of(stack: str) -> str:
    for name, marks in PARTS:
        if any(mark in stack for mark in marks):
            return name
    return "other"


class Steps:
    """The engine's Observer, counting decoder steps: how many, their rows and their time."""

    def __init__(self) -> None:
        self.count, self.rows, self.seconds = 0, 0, 0.0

    def stepped(self, rows: int, seconds: float) -> None:
        self.count, self.rows, self.seconds = self.count + 1, self.rows + rows, self.seconds + seconds

    def admitted(self, waited_seconds: list[float]) -> None:
        pass

    def cache_counted(self, tier: str, event: str, count: int = 1) -> None:
        pass

    def cache_loaded(self, tier: str, seconds: float) -> None:
        pass

    def cache_holds(self, tier: str, nbytes: int) -> None:
        pass

    def line(self, wall: float) -> str:
        steps = max(1, self.count)
        return (
            f"{self.count} decoder steps of {self.rows / steps:.1f} rows on average, "
            f"{self.seconds / steps * 1000:.0f} ms each: {self.seconds:.1f} s of {wall:.1f} s (the rest: "
            "admissions' prefills, and idle)"
        )


def engine_metrics(url: str) -> Steps:
    steps = Steps()
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "softprompt_engine_step_seconds_count":
                steps.count = int(sample.value)
            elif sample.name == "softprompt_engine_step_seconds_sum":
                steps.seconds = sample.value
            elif sample.name == "softprompt_engine_batch_rows_sum":
                steps.rows = int(sample.value)
    return steps


def in_process(engine: Engine, prompts: list, clients: int, seconds: float, new_tokens: int) -> float:
    """Closed-loop callers straight on the engine (no HTTP): tokens per second."""
    deadline = time.perf_counter() + seconds
    tokens = [0] * clients

    def caller(index: int) -> None:
        n = index
        while time.perf_counter() < deadline:
            task = n % len(prompts)
            request = generation_requests(
                engine.backbone,
                prompts=[prompts[task]],
                texts=[INPUTS[n % len(INPUTS)]],
                max_new_tokens=new_tokens,
                prompt_keys=[task],
            )
            done = threading.Event()
            result = []

            def listener(row, _delta, over, result=result, done=done):
                if over:
                    result.append(row.result())
                    done.set()

            engine.submit(request, listener)
            done.wait()
            tokens[index] += result[0].tokens
            n += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(tokens) / (time.perf_counter() - started)


def each_task_in_turn():
    """The 16 tasks' names, one after another, for many_tasks.phase to draw."""
    names = itertools.cycle(f"t{i}" for i in range(16))
    return lambda: next(names)


def profile_report(raw: Path) -> None:
    """py-spy's raw stacks (one line each: frames;...;frames count), summed by thread and by part."""
    by_thread: collections.Counter[str] = collections.Counter()
    by_part: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        kind = thread_kind(stack)
        by_thread[kind] += int(count)
        by_part[kind][part_of(stack)] += int(count)
    total = sum(by_thread.values()) or 1
    log(f"py-spy: {total} samples of active threads (idle ones left out)")
    for kind, samples in by_thread.most_common():
        log(f"  {kind}: {samples / total:.0%} of the samples")
        for part, count in by_part[kind].most_common(6):
            log(f"      {part}: {count / samples:.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--port", type=int, default=8771)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(ROOT / ".venv/bin/py-spy")

    settings = Settings(backbone_dir=ROOT / ".cache/backbones")
    backbone = load(settings)
    prompts = task_prompts(backbone, 16)
    n = args.new_tokens
    bare_generate(backbone, n)  # warm-up
    times = []
    for _ in range(3):
        started = time.perf_counter()
        tokens = bare_generate(backbone, n)
        times.append(time.perf_counter() - started)
    bare = tokens / statistics.median(times)
    log(f"(a) bare backbone, generate, batch 16, {n} new tokens: {bare:.1f} tokens/s (median of 3)")

    rates = {}
    for rows in args.batch_rows:
        steps = Steps()
        at_most = settings.model_copy(update={"engine_max_batch_rows": rows})
        engine = engine_from(at_most, backbone, steps).start()
        in_process(engine, prompts, args.clients, 5, n)  # warm-up: every prompt's keys and values cached
        steps.__init__()
        started = time.perf_counter()
        rates[rows] = in_process(engine, prompts, args.clients, args.seconds, n)
        wall = time.perf_counter() - started
        engine.stop()
        log(
            f"in-process engine, {args.clients} callers, at most {rows} rows a step: {rates[rows]:.1f} "
            f"tokens/s = {rates[rows] / bare:.2f}x (a); {steps.line(wall)}"
        )
    best_rows = max(rates, key=rates.get)
    del backbone

    with tempfile.TemporaryDirectory(prefix="softprompt-profile-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_ENGINE_MAX_BATCH_ROWS": str(best_rows),
            "SOFTPROMPT_TENANT_INFERENCE_RPS": "100000",
        }
        seed_registry(Settings(data_dir=Path(data_dir)).registry_url, load(settings), prompts, 1)
        server = start_api(env, args.port)
        url = f"http://127.0.0.1:{args.port}"
        raw = Path(data_dir) / "profile.txt"
        try:
            asyncio.run(phase(url, each_task_in_turn(), 16, 5, n))  # warm-up: every task resolved once
            before, started = engine_metrics(url), time.perf_counter()
            spy_run = subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "50",
                    "--threads",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            rate, latencies = asyncio.run(phase(url, each_task_in_turn(), args.clients, args.seconds, n))
            wall = time.perf_counter() - started
            after = engine_metrics(url)
            spy_run.wait(60)
            log(
                f"(d) HTTP, {args.clients} clients over 16 tasks, at most {best_rows} rows a step: "
                f"{rate:.1f} tokens/s = {rate / bare:.2f}x (a), {rate / rates[best_rows]:.2f}x in-process; "
                f"{len(latencies)} requests, p50 {statistics.median(latencies):.2f} s"
            )
            after.count, after.rows = after.count - before.count, after.rows - before.rows
            after.seconds -= before.seconds
            log(f"  the API's engine: {after.line(wall)}")
            if raw.is_file():
                profile_report(raw)
            else:
                log("py-spy wrote no profile (is ptrace allowed here?)")
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
