"""One tenant's heavy or malformed requests against another tenant's small one, on the real backbone.

    .venv/bin/python bench/attacks.py            # about 10 minutes on 2 cores, after the API has started

`softprompt api` runs on a fresh registry (embedded stack) with two tenants. The victim sends 2-token
generations one after another: first alone, then while the attacker sends each attack below, back to back
from --attackers concurrent loops. Each attack is either refused at once (a 4xx; its answer time is shown)
or served, and then the victim's median and worst latency are compared with its latency alone (target:
within 3x). The API's resident memory is sampled throughout (target: it grows by less than 500 MB).

The attacks are those of the hardening issue: stop strings (at the issue's size and at the limits),
classification (at the issue's size, at the limits, a 20,000-label import, a 10,000-class dataset), a
large upload, and text and numbers no database column holds, an import over the limits and /metrics
asked from a foreign Host.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ml.soft_prompt import prompt_to_bytes  # noqa: E402
from bench.fairness import cli, client, log  # noqa: E402
from bench.serving import start_api  # noqa: E402

VICTIM_BODY = {"task": None, "input": "The capital of France is", "max_new_tokens": 2}
EMBEDDING_DIM = 576  # SmolLM2-135M


@dataclass
class Outcome:
    name: str
    statuses: dict[str, int] = field(default_factory=dict)
    attack_seconds: list[float] = field(default_factory=list)
    victim: list[float] = field(default_factory=list)
    peak_rss: int = 0


class Memory:
    """The API process's resident memory, sampled every 0.2 s from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples = [self.rss()]
        self.start = self.samples[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self.rss())

    def mark(self) -> int:
        return len(self.samples)

    def peak_since(self, mark: int) -> int:
        return max(self.samples[mark:], default=self.samples[-1])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def adapter_zip(labels: list[str], template: str) -> bytes:
    """A PEFT prompt-tuning adapter for the backbone, zeros, with our softprompt.json."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"peft_type": "PROMPT_TUNING"}))
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(torch.zeros(20, EMBEDDING_DIM)))
        archive.writestr("softprompt.json", json.dumps({"template": template, "labels": labels}))
    return buffer.getvalue()


def dataset(rows: int, classes: int) -> bytes:
    return "\n".join(
        json.dumps({"text": f"review number {i}: a fine, moving film", "label": f"class {i % classes}"})
        for i in range(rows)
    ).encode()


def dataset_of(size: int) -> bytes:
    # Rows of about 300 bytes: 42 MB is 140,000 examples, within the 200,000 an upload may hold.
    line = json.dumps({"text": "a fine, moving film with a cast to remember " * 6, "label": "positive"})
    rows = [line, line.replace("positive", "negative")] * (size // (2 * len(line) + 2))
    return "\n".join(rows).encode()


def attacks(upload_bytes: int) -> dict[str, Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]]:
    stop_issue = ["\u2603" + "x" * 99_999] * 4  # never matches: every step checks all of it
    stop_limit = ["\u2603" + "x" * 255] * 4
    labels_issue = [f"{i} " + "word " * 150 for i in range(100)]
    labels_limit = [f"label {i} " + "very " * 25 for i in range(32)]  # 32 labels of ~32 tokens
    big_upload = dataset_of(upload_bytes)
    long_input = "The history of the city is long and full of stories. " * 80  # about 1,000 tokens
    raw = {"Content-Type": "application/json"}
    return {
        "1. stop strings, 4 x 100,000 chars": lambda http: http.post(
            "/v1/generate", json={"input": ["once upon a time"] * 4, "max_new_tokens": 10, "stop": stop_issue}
        ),
        "1. stop strings, 4 x 256 chars (limit)": lambda http: http.post(
            "/v1/generate", json={"input": ["once upon a time"] * 4, "max_new_tokens": 10, "stop": stop_limit}
        ),
        "generate 8 inputs of ~1,000 tokens (limit)": lambda http: http.post(
            "/v1/generate", json={"input": [long_input] * 8, "max_new_tokens": 4}
        ),
        "1. completions, 4 x 100,000-char stops": lambda http: http.post(
            "/v1/completions", json={"model": "smollm2-135m", "prompt": "once", "stop": stop_issue}
        ),
        "2. classify 16 x 100 labels of ~150 tokens": lambda http: http.post(
            "/v1/classify", json={"input": ["a fine film"] * 16, "labels": labels_issue}
        ),
        "2. classify 16 x 32 labels of ~32 tokens (limit)": lambda http: http.post(
            "/v1/classify", json={"input": ["a fine film"] * 16, "labels": labels_limit}
        ),
        "2. import with 20,000 labels": lambda http: http.post(
            "/v1/prompts/many/versions",
            files={"file": ("a.zip", adapter_zip([f"l{i}" for i in range(20_000)], "{input}"))},
        ),
        "2. dataset with 10,000 classes": lambda http: http.post(
            "/v1/datasets", files={"file": ("many.jsonl", dataset(20_000, 10_000))}
        ),
        f"3. upload of {upload_bytes // 1_000_000} MB": lambda http: http.post(
            "/v1/datasets", files={"file": ("big.jsonl", big_upload)}
        ),
        "4. NUL in a dataset name": lambda http: http.post(
            "/v1/datasets", files={"file": ("a.jsonl", dataset(20, 2))}, data={"name": "a\x00b"}
        ),
        "4. max_grad_norm 1e400": lambda http: http.post(
            "/v1/tuning/jobs",
            content=b'{"task": "t", "training_dataset": 1, "hyperparameters": {"max_grad_norm": 1e400}}',
            headers=raw,
        ),
        "5. a lone surrogate in classify labels": lambda http: http.post(
            "/v1/classify", content=b'{"input": "a", "labels": ["a", "\\ud800"]}', headers=raw
        ),
        "6. import with a 1 MB template": lambda http: http.post(
            "/v1/prompts/big/versions",
            files={"file": ("a.zip", adapter_zip(["a", "b"], "{input}"))},
            data={"template": "{input}" + "x" * 1_000_000},
        ),
        "7. /metrics from a foreign Host": lambda http: http.get(
            "/metrics", headers={"Host": "evil.example"}
        ),
    }


async def victim_loop(http: httpx.AsyncClient, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        response = await http.post("/v1/generate", json=VICTIM_BODY)
        seconds.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"the victim got {response.status_code}: {response.text}")
    return seconds


async def measure(url: str, keys: dict[str, str], args: argparse.Namespace, memory: Memory) -> None:
    async with client(url, keys["victim"]) as victim, client(url, keys["attacker"]) as attacker:
        await victim_loop(victim, 3)  # warm-up
        alone = await victim_loop(victim, args.victim_requests)
        memory.start = memory.rss()  # served and warm: what the attacks add is measured from here
        outcomes = []
        for name, attack in attacks(args.upload_mb * 1_000_000).items():
            outcome = Outcome(name)
            stop = asyncio.Event()

            async def attack_loop(attack=attack, outcome=outcome, stop=stop) -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        response = await attack(attacker)
                        status = str(response.status_code)
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    outcome.attack_seconds.append(time.perf_counter() - started)
                    outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
                    if status.startswith("4"):
                        await asyncio.sleep(0.2)  # refused: the bench asks again, not a flood of 4xx

            mark = memory.mark()
            loops = [asyncio.create_task(attack_loop()) for _ in range(args.attackers)]
            await asyncio.sleep(0.5)  # the attack is under way before the victim measures
            outcome.victim = await victim_loop(victim, args.victim_requests)
            stop.set()
            await asyncio.gather(*loops)
            outcome.peak_rss = memory.peak_since(mark)
            outcomes.append(outcome)
            log(line(outcome, alone))
    log("")
    log(table(alone, outcomes, memory.start))


def line(outcome: Outcome, alone: list[float]) -> str:
    ratio = statistics.median(outcome.victim) / statistics.median(alone)
    return f"{outcome.name}: attacker {outcome.statuses}; victim median x{ratio:.2f}"


def table(alone: list[float], outcomes: list[Outcome], start_rss: int) -> str:
    base_median, base_worst = statistics.median(alone), max(alone)
    rows = [
        f"victim alone: median {base_median * 1000:.0f} ms, worst {base_worst * 1000:.0f} ms "
        f"({len(alone)} requests of {VICTIM_BODY['max_new_tokens']} new tokens)",
        "",
        "| attack | attacker's answers | attack answered in (median) | victim median | victim worst | "
        "median / alone | API memory, most above the start |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        answers = ", ".join(f"{status} x{n}" for status, n in sorted(o.statuses.items()))
        median = statistics.median(o.victim)
        rows.append(
            f"| {o.name} | {answers} | {statistics.median(o.attack_seconds) * 1000:.0f} ms | "
            f"{median * 1000:.0f} ms | {max(o.victim) * 1000:.0f} ms | {median / base_median:.2f} | "
            f"+{(o.peak_rss - start_rss) / 2**20:.0f} MB |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim-requests", type=int, default=20, help="the victim's requests per phase")
    parser.add_argument("--attackers", type=int, default=2, help="concurrent loops sending the attack")
    parser.add_argument("--upload-mb", type=int, default=42)
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="softprompt-attacks-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_REAPER_INTERVAL_S": "0",
            "SOFTPROMPT_MAX_UPLOAD_BYTES": str(60_000_000),
        }
        cli(env, "db", "upgrade")
        keys = {tenant: cli(env, "keys", "create", "--tenant", tenant) for tenant in ("victim", "attacker")}
        server = start_api(env, args.port, Path(data_dir) / "api.log", timeout=600)
        try:
            memory = Memory(server.pid)
            asyncio.run(measure(f"http://127.0.0.1:{args.port}", keys, args, memory))
            memory.stop()
            peak = max(memory.samples)
            log(
                f"\nAPI memory: {memory.start / 2**20:.0f} MB before the attacks (backbone loaded), at most "
                f"{peak / 2**20:.0f} MB (+{(peak - memory.start) / 2**20:.0f} MB; target < 500 MB)"
            )
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
