"""One tenant's heavy or malformed requests against another tenant's small one, on the real backbone.

    .venv/bin/python bench/attacks.py            # about 15 minutes on 2 cores, after the API has started

`softprompt api` runs on a fresh registry (embedded stack) with two tenants. The victim sends 2-token
generations one after another: first alone, then while the attacker sends each attack below, back to back
from --attackers concurrent loops. Each attack is either refused at once (a 4xx; its answer time is shown)
or served, and then the victim's median and worst latency are compared with its latency alone (target:
within 3x). The API's resident memory is sampled throughout (target: it grows by less than 500 MB).

The attacks are those of the first hardening pass: stop strings (at the issue's size and at the limits),
classification (at the issue's size, at the limits, a 20,000-label import, a 10,000-class dataset), a
large upload, and text and numbers no database column holds, an import over the limits and /metrics
asked from a foreign Host. Then the second pass's: zip bombs (bzip2 and deflate members of 1 GiB whose
headers claim 100 bytes), a prompt of 3e38 imported, sampling from an imported prompt 500 times the size
of the embeddings, JSON nested 100,000 deep in an import, 1,000 event streams of one job, 500 connections
sending headers a byte a second and 200 sending an upload 100 bytes a second; and last (13), with one
worker started by the bench, an evaluation past the work cap, the attacker's largest accepted runs
queued and running, and the victim's 2-step job: how long it waits for the worker (target: within the
time slice plus a minute). The victim's failures are counted (target: 0) and its worst latency compared
with its worst alone (target: within 3x). `--only 8. 13.` runs the attacks whose names hold those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import hostile  # noqa: E402
from bench.fairness import cli, client, log  # noqa: E402
from bench.hostile import adapter_zip  # noqa: E402
from bench.serving import start_api  # noqa: E402

VICTIM_BODY = {"task": None, "input": "The capital of France is", "max_new_tokens": 2}
# The imported prompt the sampling attack draws from: this many times the size of the backbone's own
# embeddings, within the import's bound (app/ml/prompt_check.py).
LOUD_SCALE = 500.0


@dataclass
class Outcome:
    name: str
    statuses: dict[str, int] = field(default_factory=dict)
    attack_seconds: list[float] = field(default_factory=list)
    victim: list[float] = field(default_factory=list)
    victim_failures: int = 0
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
        "8. zip bomb: bzip2 member of 1 GiB claiming 100 bytes": lambda http: http.post(
            "/v1/prompts/bomb/versions", files={"file": ("a.zip", hostile.bzip2_bomb())}
        ),
        "8. zip bomb: deflate member of 1 GiB claiming 100 bytes": lambda http: http.post(
            "/v1/prompts/bomb/versions", files={"file": ("a.zip", hostile.deflate_bomb(claimed=100))}
        ),
        "9. import a prompt of 3e38": lambda http: http.post(
            "/v1/prompts/extreme/versions",
            files={"file": ("a.zip", adapter_zip(None, "{input}", hostile.extreme_prompt()))},
        ),
        f"9. sample from a prompt {LOUD_SCALE:.0f}x the embeddings' size": lambda http: http.post(
            "/v1/generate",
            json={"task": "loud", "input": ["once upon a time"] * 4, "max_new_tokens": 8, "temperature": 1.0},
        ),
        "10. adapter_config.json nested 100,000 deep": lambda http: http.post(
            "/v1/prompts/deep/versions",
            files={"file": ("a.zip", adapter_zip(None, "{input}", config=hostile.deep_json()))},
        ),
        "10. labels field nested 100,000 deep": lambda http: http.post(
            "/v1/prompts/deep/versions",
            files={"file": ("a.zip", adapter_zip(None, "{input}"))},
            data={"labels": hostile.deep_json().decode()},
        ),
    }


async def victim_loop(http: httpx.AsyncClient, count: int, outcome: Outcome | None = None) -> list[float]:
    """``count`` victim requests one after another; their times, and their failures in ``outcome``."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        try:
            response = await http.post("/v1/generate", json=VICTIM_BODY)
            failed = response.status_code != 200
        except httpx.HTTPError:
            failed = True
        seconds.append(time.perf_counter() - started)
        if failed and outcome is None:
            raise RuntimeError("the victim failed while alone")
        if failed:
            outcome.victim_failures += 1
    return seconds


def floods(url: str, keys: dict[str, str], job_id: int) -> dict[str, Callable[[asyncio.Event], Awaitable]]:
    """Attacks that are one long action, held until the victim has measured: their answers as a Counter."""
    host, port = url.removeprefix("http://").split(":")

    async def slow(stop: asyncio.Event):
        answers, ended_after = await hostile.trickles(host, int(port), 500, 200, stop)
        for kind, seconds in ended_after.items():
            if seconds:
                answers[f"{kind}: ended after {statistics.median(seconds):.1f} s (median)"] = len(seconds)
        return answers

    return {
        "11. 1,000 event streams of one job": lambda stop: hostile.event_streams(
            url, keys["attacker"], job_id, 1000, stop
        ),
        "12. 500 slow headers and 200 slow bodies": slow,
    }


async def measure(url: str, keys: dict[str, str], args: argparse.Namespace, memory: Memory) -> None:
    async with client(url, keys["victim"]) as victim, client(url, keys["attacker"]) as attacker:
        await victim_loop(victim, 3)  # warm-up
        alone = await victim_loop(victim, args.victim_requests)
        job_id = await _setup(attacker)
        memory.start = memory.rss()  # served and warm: what the attacks add is measured from here
        outcomes = []
        chosen = {
            name: attack
            for name, attack in attacks(args.upload_mb * 1_000_000).items()
            if any(part in name for part in args.only)
        }
        for name, attack in chosen.items():
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
            outcome.victim = await victim_loop(victim, args.victim_requests, outcome)
            stop.set()
            await asyncio.gather(*loops)
            outcome.peak_rss = memory.peak_since(mark)
            outcomes.append(outcome)
            log(line(outcome, alone))
        for name, flood in floods(url, keys, job_id).items():
            if not any(part in name for part in args.only):
                continue
            outcome, stop, mark = Outcome(name), asyncio.Event(), memory.mark()
            started = time.perf_counter()
            held = asyncio.create_task(flood(stop))
            await asyncio.sleep(12)  # past the header deadline (10 s): the server has acted on every one
            outcome.victim = await victim_loop(victim, args.victim_requests, outcome)
            stop.set()
            outcome.statuses = dict(await held)
            outcome.attack_seconds = [time.perf_counter() - started]
            outcome.peak_rss = memory.peak_since(mark)
            outcomes.append(outcome)
            log(line(outcome, alone))
    log("")
    log(table(alone, outcomes, memory.start))


async def worker_turns(url: str, keys: dict[str, str], env: dict, log_path: Path) -> None:
    """13: with one worker, the attacker's huge evaluation (refused) and its largest accepted runs, queued
    and running, against the victim's 2-step job: how long the victim's job waits for the worker."""
    worker = subprocess.Popen(
        [str(ROOT / ".venv/bin/softprompt"), "worker"],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        async with client(url, keys["victim"]) as victim, client(url, keys["attacker"]) as attacker:
            rows = "\n".join(
                json.dumps({"input": f"Describe item {i} of the catalogue:", "output": f"item {i}"})
                for i in range(10_000)
            )
            uploaded = await attacker.post("/v1/datasets", files={"file": ("big.jsonl", rows.encode())})
            huge = {"dataset": uploaded.json()["id"], "models": [None] * 8, "template": "{input}"}
            started = time.perf_counter()
            refused = await attacker.post("/v1/evaluations", json={**huge, "max_new_tokens": 256})
            answered_ms = (time.perf_counter() - started) * 1000
            code = refused.json().get("error", {}).get("code")
            log(
                f"13. evaluation of 8 models x 10,000 rows x 256 new tokens: {refused.status_code} {code} "
                f"in {answered_ms:.0f} ms"
            )
            accepted = await attacker.post(
                "/v1/evaluations", json={**huge, "models": [None], "max_new_tokens": 64}
            )
            log(f"    the largest accepted, 1 model x 10,000 rows x 64 new tokens: {accepted.status_code}")
            reviews = await attacker.post("/v1/datasets", files={"file": ("r.jsonl", dataset(400, 2))})
            long_job = {"task": "long", "training_dataset": reviews.json()["id"]}
            for _ in range(2):
                answer = await attacker.post(
                    "/v1/tuning/jobs", json={**long_job, "hyperparameters": {"steps": 20_000}}
                )
                log(f"    a job of 20,000 steps of 32: {answer.status_code}")
            evaluation = f"/v1/evaluations/{accepted.json()['id']}"
            while (await attacker.get(evaluation)).json()["progress"]["done"] == 0:
                await asyncio.sleep(1)
            small = await victim.post("/v1/datasets", files={"file": ("s.jsonl", dataset(40, 2))})
            body = {"task": "small", "training_dataset": small.json()["id"], "hyperparameters": {"steps": 2}}
            submitted = time.perf_counter()
            job = (await victim.post("/v1/tuning/jobs", json=body)).json()
            started_after = None
            while True:
                found = (await victim.get(f"/v1/tuning/jobs/{job['id']}")).json()
                if started_after is None and found["status"] != "queued":
                    started_after = time.perf_counter() - submitted
                if found["status"] in ("succeeded", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.5)
            slice_s = float(env["SOFTPROMPT_RUN_TIME_SLICE_S"])
            log(
                f"    the victim's 2-step job started {started_after:.0f} s after it was submitted "
                f"(time slice {slice_s:.0f} s; target within {slice_s + 60:.0f} s) and ended "
                f"{found['status']} {time.perf_counter() - submitted:.0f} s after;"
                f" the attacker's evaluation: "
                f"{(await attacker.get(evaluation)).json()['progress']}"
            )
            await attacker.post(f"{evaluation}/cancel")
            for listed in (await attacker.get("/v1/tuning/jobs")).json()["data"]:
                await attacker.post(f"/v1/tuning/jobs/{listed['id']}/cancel")
    finally:
        worker.terminate()
        worker.wait(60)


async def _setup(attacker: httpx.AsyncClient) -> int:
    """What some attacks need: the loud prompt imported, and a job whose events can be streamed."""
    loud = adapter_zip(None, "{input}", hostile.loud_prompt(LOUD_SCALE))
    response = await attacker.post("/v1/prompts/loud/versions", files={"file": ("a.zip", loud)})
    log(f"setup: the prompt {LOUD_SCALE:.0f}x the embeddings' size imported: {response.status_code}")
    uploaded = await attacker.post("/v1/datasets", files={"file": ("d.jsonl", dataset(20, 2))})
    job = await attacker.post(
        "/v1/tuning/jobs",
        json={"task": "streamed", "training_dataset": uploaded.json()["id"], "hyperparameters": {"steps": 2}},
    )
    return job.json()["id"]


def line(outcome: Outcome, alone: list[float]) -> str:
    ratio = statistics.median(outcome.victim) / statistics.median(alone)
    return (
        f"{outcome.name}: attacker {outcome.statuses}; victim median x{ratio:.2f}, worst "
        f"{max(outcome.victim) * 1000:.0f} ms, failures {outcome.victim_failures}"
    )


def table(alone: list[float], outcomes: list[Outcome], start_rss: int) -> str:
    base_median, base_worst = statistics.median(alone), max(alone)
    rows = [
        f"victim alone: median {base_median * 1000:.0f} ms, worst {base_worst * 1000:.0f} ms "
        f"({len(alone)} requests of {VICTIM_BODY['max_new_tokens']} new tokens)",
        "",
        "| attack | attacker's answers | attack answered in (median) | victim median | victim worst | "
        "median / alone | worst / alone's worst | victim failures | API memory, most above the start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        answers = ", ".join(f"{status} x{n}" for status, n in sorted(o.statuses.items()))
        median = statistics.median(o.victim)
        rows.append(
            f"| {o.name} | {answers} | {statistics.median(o.attack_seconds) * 1000:.0f} ms | "
            f"{median * 1000:.0f} ms | {max(o.victim) * 1000:.0f} ms | {median / base_median:.2f} | "
            f"{max(o.victim) / base_worst:.2f} | {o.victim_failures} | "
            f"+{(o.peak_rss - start_rss) / 2**20:.0f} MB |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victim-requests", type=int, default=20, help="the victim's requests per phase")
    parser.add_argument("--attackers", type=int, default=2, help="concurrent loops sending the attack")
    parser.add_argument("--upload-mb", type=int, default=42)
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--time-slice-s", type=float, default=60.0, help="the workers' time slice (13)")
    parser.add_argument(
        "--only", nargs="*", default=[""], help="run only the attacks whose names hold one of these"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="softprompt-attacks-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_REAPER_INTERVAL_S": "5",
            "SOFTPROMPT_RUN_TIME_SLICE_S": str(args.time_slice_s),
            "SOFTPROMPT_MAX_UPLOAD_BYTES": str(60_000_000),
        }
        cli(env, "db", "upgrade")
        keys = {tenant: cli(env, "keys", "create", "--tenant", tenant) for tenant in ("victim", "attacker")}
        server = start_api(env, args.port, Path(data_dir) / "api.log", timeout=600)
        try:
            memory = Memory(server.pid)
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(measure(url, keys, args, memory))
            memory.stop()
            if any(part in "13. worker turns" for part in args.only):
                asyncio.run(worker_turns(url, keys, env, Path(data_dir) / "worker.log"))
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
