"""The CUDA paths of a worker and of the API, checked in one run of a few minutes; one table, exit 1 on a
failed check.

    .venv/bin/python bench/gpu_check.py                     # the default backbone, on CUDA if there is one
    .venv/bin/python bench/gpu_check.py --backbone DIR      # another model directory (the suite: a tiny one)

On CUDA the backbone runs as the service runs it there (bfloat16 weights); on a CPU the same checks run in
a reduced form (fewer rows and tokens, bfloat16 autocast on the CPU), which tests/ml/test_gpu_check.py
runs so that the script keeps working. The checks:

1. A training step of each method (prompt, prefix) under bfloat16, as a job trains on CUDA: the loss is
   finite, and the prompt's gradient points where a float32 step's does on the same batch (cosine at least
   GRADIENT_COSINE) with a norm within GRADIENT_NORM of it.
2. Batched generation over mixed tasks (the bare backbone, a prompt-tuned and a prefix-tuned version in
   one batch, as the engine serves them) against `transformers` `generate` one row at a time (a prefix is
   given to the model as its past keys and values): the share of identical greedy outputs, at least
   SAME_OUTPUTS.
3. Decoder tokens per second of the engine at batch 1, 16 and 64 (CPU: 1 and 4), the bare backbone.
4. The tuning step's time at batch 32 (CPU: 4), per method.
5. Peak memory: CUDA's allocator peak; on a CPU, the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.contract.kinds import InitStrategy, Method  # noqa: E402
from app.ml.backbone import Backbone, load_backbone, materialize_backbone  # noqa: E402
from app.ml.inference import generate, generate_reference  # noqa: E402
from app.ml.layout import context_ids, target_ids, target_log_probs  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt, is_prefix  # noqa: E402

GRADIENT_COSINE = 0.98  # bfloat16 matmuls keep about 3 significant digits; the direction must survive
GRADIENT_NORM = 0.10  # relative difference of the two gradients' norms
SAME_OUTPUTS = 0.90  # greedy outputs may part where two tokens' logits tie within bfloat16's rounding
TEXTS = [
    "The capital of France is",
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "Translate to French: good morning",
    "The quick brown fox",
    "Question: what is two plus two?\nAnswer:",
    "Once upon a time",
]


@dataclasses.dataclass
class Row:
    check: str
    value: str
    passed: bool | None = None  # None: a measurement, not a check


def load(directory: str | None, device: str) -> Backbone:
    if directory:
        return load_backbone("checked", Path(directory), device=device)
    settings = Settings(backbone_dir=ROOT / ".cache/backbones")
    name = settings.default_backbone
    path = materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
    return load_backbone(name, path, device=device)


def float32_copy(backbone: Backbone) -> Backbone:
    """The same weights in float32, the reference a bfloat16 step is held to."""
    if backbone.dtype == torch.float32:
        return backbone
    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model).float(), dtype=torch.float32)


def start(backbone: Backbone, method: Method, k: int = 8) -> torch.Tensor:
    make = init_prefix if method == Method.PREFIX else init_prompt
    return make(backbone, num_virtual_tokens=k, strategy=InitStrategy.VOCAB, seed=0).to(backbone.device)


def batch(backbone: Backbone, size: int) -> tuple[list[list[int]], list[list[int]]]:
    rendered = [TEXTS[i % len(TEXTS)] for i in range(size)]
    contexts = [context_ids(backbone, text) for text in rendered]
    targets = [target_ids(backbone, text, "yes, and more", with_eos=True) for text in rendered]
    return contexts, targets


def gradient(
    backbone: Backbone, prompt: torch.Tensor, contexts, targets, *, low: bool
) -> tuple[float, torch.Tensor]:
    """One training step's loss and the prompt's gradient, under bfloat16 autocast when ``low``."""
    param = torch.nn.Parameter(prompt.detach().clone().float())
    autocast = torch.autocast(backbone.device.type, dtype=torch.bfloat16, enabled=low)
    with autocast:
        log_probs, _ = target_log_probs(backbone, [param] * len(contexts), contexts, targets)
        loss = -log_probs.mean()
    loss.backward()
    return float(loss.detach()), param.grad.detach().float()


def training_checks(backbone: Backbone, reference: Backbone, rows: int) -> list[Row]:
    out = []
    contexts, targets = batch(backbone, rows)
    for method in Method:
        prompt = start(backbone, method)
        loss, low = gradient(backbone, prompt, contexts, targets, low=True)
        _, full = gradient(reference, prompt, contexts, targets, low=False)
        cosine = float(torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0))
        norm = abs(float(low.norm() / full.norm()) - 1)
        out.append(Row(f"{method} step: bfloat16 loss finite", f"{loss:.4f}", math.isfinite(loss)))
        out.append(
            Row(f"{method} step: gradient cosine vs float32", f"{cosine:.4f}", cosine >= GRADIENT_COSINE)
        )
        out.append(Row(f"{method} step: gradient norm vs float32", f"{norm:+.3f}", norm <= GRADIENT_NORM))
    return out


def hf_generate(backbone: Backbone, prompt: torch.Tensor | None, text: str, tokens: int) -> list[int]:
    """`transformers` greedy `generate` for one row: the ids after the input, the end token dropped."""
    if prompt is not None and is_prefix(prompt):  # the model's own forward over the prefix's keys and values
        return generate_reference(backbone, prompt=prompt, text=text, max_new_tokens=tokens)
    ids = torch.tensor([context_ids(backbone, text)], device=backbone.device)
    options = {"max_new_tokens": tokens, "do_sample": False, "pad_token_id": backbone.tokenizer.pad_token_id}
    with torch.inference_mode():
        if prompt is None:
            produced = backbone.model.generate(input_ids=ids, **options)[0, ids.shape[1] :]
        else:
            embeds = torch.cat([prompt.to(backbone.dtype), backbone.model.get_input_embeddings()(ids[0])])
            produced = backbone.model.generate(inputs_embeds=embeds[None], **options)[0]
    out = produced.tolist()
    return out[: out.index(backbone.eos_token_id)] if backbone.eos_token_id in out else out


def generation_check(backbone: Backbone, rows: int, tokens: int) -> Row:
    tasks = [None, start(backbone, Method.PROMPT), start(backbone, Method.PREFIX)]
    prompts = [tasks[i % 3] for i in range(rows)]
    texts = [TEXTS[i % len(TEXTS)] for i in range(rows)]
    batched = generate(backbone, prompts=prompts, texts=texts, max_new_tokens=tokens)
    same = sum(
        got.token_ids == hf_generate(backbone, prompt, text, tokens)
        for got, prompt, text in zip(batched, prompts, texts, strict=True)
    )
    share = same / rows
    return Row(
        f"mixed-task batch of {rows} vs transformers generate",
        f"{same}/{rows} identical",
        share >= SAME_OUTPUTS,
    )


def timed(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    run()  # warm-up: kernels chosen, caches filled
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / repeats


def decode_speed(backbone: Backbone, sizes: list[int], tokens: int) -> list[Row]:
    out = []
    for size in sizes:
        texts = [TEXTS[i % len(TEXTS)] for i in range(size)]
        seconds = timed(
            lambda t=texts: generate(backbone, prompts=[None] * len(t), texts=t, max_new_tokens=tokens),
            backbone.device,
            2,
        )
        out.append(Row(f"decoder tokens/s, batch {size}", f"{size * tokens / seconds:,.0f}"))
    return out


def step_time(backbone: Backbone, rows: int) -> list[Row]:
    out = []
    contexts, targets = batch(backbone, rows)
    low = backbone.device.type == "cuda"  # as a job trains: bfloat16 on CUDA, float32 on a CPU
    for method in Method:
        prompt = start(backbone, method)
        seconds = timed(lambda p=prompt: gradient(backbone, p, contexts, targets, low=low), backbone.device)
        out.append(Row(f"{method} tuning step, batch {rows}", f"{1000 * seconds:,.1f} ms"))
    return out


def peak_memory(device: torch.device) -> Row:
    if device.type == "cuda":
        return Row("peak memory (CUDA allocator)", f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
    return Row(
        "peak memory (resident)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", help="a model directory; default: the service's default backbone")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    full = device == "cuda"
    backbone = load(args.backbone, device)
    name = torch.cuda.get_device_name() if full else "CPU (reduced form)"
    rows = [
        *training_checks(backbone, float32_copy(backbone), rows=16 if full else 4),
        generation_check(backbone, rows=48 if full else 6, tokens=24 if full else 6),
        *decode_speed(backbone, [1, 16, 64] if full else [1, 4], tokens=64 if full else 8),
        *step_time(backbone, rows=32 if full else 4),
        peak_memory(backbone.device),
    ]
    print(f"{backbone.name} on {name}, torch {torch.__version__}, {backbone.dtype}")
    print("| check | value | result |")
    print("| --- | --- | --- |")
    for row in rows:
        result = "" if row.passed is None else ("pass" if row.passed else "FAIL")
        print(f"| {row.check} | {row.value} | {result} |")
    failed = [row.check for row in rows if row.passed is False]
    print(
        f"{len(failed)} of {sum(row.passed is not None for row in rows)} checks failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
