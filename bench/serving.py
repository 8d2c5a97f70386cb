"""Serving throughput and latency on the real backbone, against the bare backbone and PEFT, in one run.

    .venv/bin/python bench/serving.py            # (a)-(d), latency and memory; about 10 minutes on 2 cores

(a) the bare backbone, transformers `generate`, batch 16, no prompt: the reference;
(b) our engine in-process, the same 16 inputs with 16 different prompts; and (b2) with 8 prompt-tuned and
    8 prefix-tuned tasks mixed in the batch;
(c) PEFT `PeftModel.generate`, one request at a time, one prompt-tuning adapter: the peer;
(d) HTTP through `softprompt api`: 64 concurrent clients over 16 tasks.
Then p50/p99 latency through HTTP at concurrency 1, 8 and 32, and the API process's memory growth with
1,000 prompt versions loaded. Throughput is generated tokens per second (end-of-sequence not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.models import DEFAULT_TENANT, PromptVersion, Task, Tenant  # noqa: E402
from app.db.session import session_scope  # noqa: E402
from app.ml.backbone import Backbone, load_backbone, materialize_backbone  # noqa: E402
from app.ml.engine import Engine  # noqa: E402
from app.ml.inference import generation_requests  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt, prompt_to_bytes  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains.",
    "Describe the taste of a ripe mango.",
    "What are the benefits of learning a second language?",
    "Write a poem about the sea at night.",
    "Give advice to someone starting their first job.",
    "Summarize the plot of a heist movie you would like to see.",
    "Why do cats like boxes?",
    "Describe a busy market in the morning.",
    "Explain what a database index is.",
    "Write a letter to your future self.",
    "What makes a good cup of coffee?",
    "Tell me about the history of bicycles.",
    "Describe a thunderstorm from the point of view of a tree.",
    "How do airplanes stay in the air?",
]
# In the instruct backbone's chat format, so that every row writes a full answer rather than stopping at once.
INPUTS = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
VIRTUAL_TOKENS = 20


def log(message: str) -> None:
    print(message, flush=True)


def load(settings: Settings) -> Backbone:
    name = settings.default_backbone
    path = materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
    return load_backbone(name, path, device=settings.device)


def task_prompts(backbone: Backbone, count: int) -> list[torch.Tensor]:
    """Prompts made of real token embeddings (as the `vocab` init), so the text stays ordinary."""
    return [
        init_prompt(backbone, num_virtual_tokens=VIRTUAL_TOKENS, strategy="vocab", seed=i)
        for i in range(count)
    ]


def counted(ids: list[int], eos: int) -> int:
    return ids.index(eos) if eos in ids else len(ids)


def interleaved_medians(runs: dict[str, object], repeats: int) -> dict[str, tuple[float, int]]:
    """name -> (median seconds, tokens of one run). The runs take turns, after one warm-up each, so a slow
    spell of a shared machine lands on all of them rather than on whichever ran then."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(times[name]), tokens[name]) for name in runs}


def bare_generate(backbone: Backbone, new_tokens: int) -> int:
    tokenizer, model = backbone.tokenizer, backbone.model
    tokenizer.padding_side = "left"
    batch = tokenizer(INPUTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()
    return sum(counted(row, backbone.eos_token_id) for row in new)


def task_prefixes(backbone: Backbone, count: int) -> list[torch.Tensor]:
    """Prefixes with the keys and values real tokens leave (the `vocab` init), so the text stays ordinary."""
    return [
        init_prefix(backbone, num_virtual_tokens=VIRTUAL_TOKENS, strategy="vocab", seed=100 + i)
        for i in range(count)
    ]


def engine_generate(engine: Engine, prompts: list[torch.Tensor], new_tokens: int) -> int:
    requests = generation_requests(
        engine.backbone,
        prompts=prompts,
        texts=INPUTS,
        max_new_tokens=new_tokens,
        prompt_keys=[id(p) for p in prompts],  # each soft prompt's keys and values cached once
    )
    done = threading.Event()
    results: list = []

    def listener(sequence, _delta, over):
        if over:
            results.append(sequence.result())
            if len(results) == len(requests):
                done.set()

    engine.submit(requests, listener)
    done.wait()
    return sum(g.tokens for g in results)


def peft_generate(backbone: Backbone, new_tokens: int, rows: int) -> int:
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL_TOKENS)
    model = get_peft_model(backbone.model, config)
    assert isinstance(model, PeftModel)
    tokenizer = backbone.tokenizer
    tokens = 0
    with torch.inference_mode():
        for text in INPUTS[:rows]:
            batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
            out = model.generate(
                **batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            tokens += counted(out[0, batch["input_ids"].shape[1] :].tolist(), backbone.eos_token_id)
    return tokens


def seed_registry(
    db_url: str, backbone: Backbone, prompts: list[torch.Tensor], versions_of_task0: int
) -> None:
    """16 tasks t0..t15 with one version each, and more versions of t0 for the memory figure, owned by the
    tenant "default" that the API serves on loopback while no key exists."""
    upgrade(db_url)
    with session_scope(db_url) as session:
        owner = session.scalars(select(Tenant.id).where(Tenant.name == DEFAULT_TENANT)).one()
        for i, prompt in enumerate(prompts):
            task = Task(tenant_id=owner, name=f"t{i}", last_version=0)
            session.add(task)
            session.flush()
            count = versions_of_task0 if i == 0 else 1
            for v in range(1, count + 1):
                vectors = prompt_to_bytes(prompt + 0.001 * v if v > 1 else prompt)
                session.add(
                    PromptVersion(
                        task_id=task.id,
                        version=v,
                        base_model=backbone.name,
                        num_virtual_tokens=VIRTUAL_TOKENS,
                        embedding_dim=backbone.embedding_dim,
                        template="{input}",
                        labels=None,
                        kind="generation",
                        vectors=vectors,
                        sha256=hashlib.sha256(vectors).hexdigest(),
                        metrics={},
                    )
                )
            task.last_version = count


async def http_load(
    url: str, clients: int, per_client: int, new_tokens: int
) -> tuple[float, int, list[float]]:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another, spread over
    the 16 tasks. Returns (wall seconds, generated tokens, per-request latencies)."""
    latencies: list[float] = []
    tokens = 0

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for n in range(per_client):
            row = (index + n * clients) % len(INPUTS)
            body = {"task": f"t{row % 16}", "input": INPUTS[row], "max_new_tokens": new_tokens}
            started = time.perf_counter()
            response = await http.post("/v1/generate", json=body)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        return time.perf_counter() - started, tokens, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def start_api(env: dict, port: int, log_path: Path | None = None, timeout: float = 300) -> subprocess.Popen:
    """`softprompt api` on ``port``, once /readyz answers; its output goes to ``log_path`` (or nowhere),
    whose end is shown if it never becomes ready."""
    with log_path.open("wb") if log_path else open(os.devnull, "wb") as out:
        server = subprocess.Popen(
            [str(ROOT / ".venv/bin/softprompt"), "api", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    server.wait()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:]) if log_path else ""
    raise RuntimeError(f"the API did not become ready; the end of its log:\n{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peft-rows", type=int, default=16, help="requests PEFT generates one at a time")
    parser.add_argument(
        "--versions", type=int, default=1000, help="prompt versions loaded for the memory figure"
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()

    settings = Settings(backbone_dir=ROOT / ".cache/backbones")
    backbone = load(settings)
    prompts = task_prompts(backbone, 16)
    prefixes = task_prefixes(backbone, 8)
    mixed = [p for pair in zip(prompts[:8], prefixes, strict=True) for p in pair]  # prompt, prefix, ...
    n = args.new_tokens
    log(
        f"backbone {backbone.name} on {backbone.device} ({backbone.dtype}), "
        f"torch threads {torch.get_num_threads()}"
    )
    log(f"16 inputs, {n} new tokens each, greedy; {VIRTUAL_TOKENS} virtual tokens per prompt")

    engine = Engine(backbone, max_batch_rows=32, max_queued_rows=256, prompt_kv_cache_bytes=128 << 20).start()
    cold_started = time.perf_counter()
    engine_generate(engine, prompts, n)
    cold = time.perf_counter() - cold_started
    measured = interleaved_medians(
        {
            "bare": lambda: bare_generate(backbone, n),
            "engine": lambda: engine_generate(engine, prompts, n),
            "mixed": lambda: engine_generate(engine, mixed, n),
        },
        args.repeats,
    )
    cached = engine.prompt_kv_cache.get(id(prefixes[0]), prefixes[0]).nbytes
    engine.stop()
    seconds, tokens = measured["bare"]
    bare = tokens / seconds
    log(
        f"(a) bare backbone, transformers generate, batch 16: {seconds:.2f} s, {tokens} tokens, "
        f"{bare:.1f} tok/s (median of {args.repeats})"
    )
    seconds, tokens = measured["engine"]
    ours = tokens / seconds
    log(
        f"(b) engine in-process, 16 rows with 16 different prompts: {seconds:.2f} s, {tokens} tokens, "
        f"{ours:.1f} tok/s (median of {args.repeats}, taking turns with (a); the first run, before the "
        f"prompts' keys and values were cached: {cold:.2f} s)"
    )

    seconds, tokens = measured["mixed"]
    mixed_rate = tokens / seconds
    log(
        f"(b2) engine in-process, 16 rows: 8 prompt-tuned and 8 prefix-tuned tasks: {seconds:.2f} s, "
        f"{tokens} tokens, {mixed_rate:.1f} tok/s (median of {args.repeats}, taking turns with (a))"
    )
    tensors = prefixes[0].nbytes
    log(
        f"a prefix version in the keys-and-values cache: {cached / 2**10:.0f} KiB for {tensors / 2**10:.0f} "
        f"KiB of tensors = {cached / tensors:.2f}x   (target <= 1.5)"
    )

    started = time.perf_counter()
    tokens = peft_generate(backbone, n, args.peft_rows)
    seconds = time.perf_counter() - started
    peft = tokens / seconds
    log(
        f"(c) PEFT PeftModel.generate, one request at a time, {args.peft_rows} requests: {seconds:.2f} s, "
        f"{tokens} tokens, {peft:.1f} tok/s"
    )
    log(f"ratio (b)/(a) = {ours / bare:.2f}   (target >= 0.95)")
    log(f"ratio (b2)/(a) = {mixed_rate / bare:.2f}   (target >= 0.95)")
    log(f"ratio (b)/(c) = {ours / peft:.1f}   (target >= 5)")
    if args.skip_http:
        return 0

    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
            "SOFTPROMPT_ENGINE_MAX_BATCH_ROWS": "64",
            # One tenant ("default", open on loopback) sends everything here: its quotas are not measured.
            "SOFTPROMPT_TENANT_INFERENCE_RPS": "100000",
        }
        db_url = Settings(data_dir=Path(data_dir)).registry_url
        seed_registry(db_url, backbone, prompts, versions_of_task0=args.versions)
        server = start_api(env, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            # Memory first, on a fresh process: each version is loaded by a one-token generation, as a
            # user's first request to it would. The prompt keys-and-values pool fills up to its bound on
            # the way; it is a fixed-size cache of hot prompts, so its share is shown apart.
            config = backbone.model.config
            head_dim = config.hidden_size // config.num_attention_heads
            kv = 2 * config.num_hidden_layers * config.num_key_value_heads * VIRTUAL_TOKENS * head_dim * 4
            pool = min(args.versions * kv, 128 << 20)
            asyncio.run(_load_versions(url, 1))
            before = rss_bytes(server.pid)
            asyncio.run(_load_versions(url, args.versions))
            grown = rss_bytes(server.pid) - before
            tensor = VIRTUAL_TOKENS * backbone.embedding_dim * 4
            per_version = (grown - pool) / args.versions
            log(
                f"memory: {args.versions} versions loaded: RSS +{grown / 2**20:.1f} MiB, of which at most "
                f"{pool / 2**20:.0f} MiB is the keys-and-values pool (its bound; {kv / 2**10:.0f} KiB per "
                f"prompt); the rest is {per_version / 1024:.1f} KiB per version against a "
                f"{tensor / 1024:.1f} KiB tensor ({per_version / tensor:.2f}x; target <= 1.5x); with the "
                f"pool counted, {grown / args.versions / tensor:.2f}x"
            )

            asyncio.run(http_load(url, 16, 1, n))  # warm-up: every task's prompt resolved once
            seconds, tokens, _ = asyncio.run(http_load(url, 64, 2, n))
            http = tokens / seconds
            log(
                f"(d) HTTP, 64 concurrent clients over 16 tasks, 128 requests: {seconds:.2f} s, "
                f"{tokens} tokens, {http:.1f} tok/s"
            )
            log(f"ratio (d)/(a) = {http / bare:.2f}   (target >= 0.80)")
            p50_at_1 = None
            for concurrency, per_client in ((1, 10), (8, 4), (32, 3)):
                _, _, latencies = asyncio.run(http_load(url, concurrency, per_client, n))
                p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
                p50_at_1 = p50_at_1 or p50
                log(
                    f"latency at concurrency {concurrency:>2} ({len(latencies)} requests): p50 {p50:.2f} s, "
                    f"p99 {p99:.2f} s ({p99 / p50_at_1:.1f}x p50 at concurrency 1)"
                )
        finally:
            server.terminate()
            server.wait(30)
    return 0


async def _load_versions(url: str, versions: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for start in range(1, versions + 1, 8):
            batch = range(start, min(start + 8, versions + 1))
            bodies = [{"task": f"t0@{v}", "input": "Hello", "max_new_tokens": 1} for v in batch]
            for response in await asyncio.gather(*(http.post("/v1/generate", json=b) for b in bodies)):
                response.raise_for_status()


if __name__ == "__main__":
    sys.exit(main())
