"""DART data-to-text through the service's own code: the bare backbone and the default job's version, scored
by an evaluation run on the 500 test inputs with all their references, against PEFT prompt tuning at the
same budget; and the evaluation's batched decoding against the same decoding one row at a time.

    .venv/bin/python bench/generation.py                        # the default job on all 6,980 rows
    .venv/bin/python bench/generation.py --train-rows 2000      # the default job on a seeded sample
    .venv/bin/python bench/generation.py --steps 60 --peft-only # PEFT's side alone, at the job's budget

What runs: a temporary SQLite registry; the training rows and the test set uploaded as a worker would
find them; the default job (only its template is given) created and run here as a worker runs it; an
evaluation of ``dart@1`` and the bare backbone (``null``) run here as a worker runs it, timed; the tuned
version's decoding again one row at a time, timed, on the first ``--sequential-rows`` inputs; then PEFT
prompt tuning with its guide's recipe (20 virtual tokens from a text that describes the task, AdamW 3e-2,
no warm-up) for the job's steps and batch on the job's own training rows (its hold-out left out). PEFT's
learned embeddings are decoded greedily by the engine, as the evaluation decodes a version, and the first
``--check-rows`` inputs again by PEFT's own ``generate`` (without its cache, which is wrong for prompt
tuning here), to show the two give the same text; all are scored with the same functions. The test set is
read once, at the end of each trainer's run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import Hyperparameters, default_steps  # noqa: E402
from app.ml.generation_scores import generation_report  # noqa: E402
from app.ml.inference import generate  # noqa: E402
from app.ml.text import render  # noqa: E402
from app.ml.trainer import BatchOrder, Example, TrainConfig, lr_factor  # noqa: E402
from app.services.evaluation.evaluating import CHUNK_ROWS as EVALUATION_CHUNK  # noqa: E402
from app.services.tuning.training import split_holdout  # noqa: E402
from bench.in_process import Registry  # noqa: E402
from bench.tuning import load, log, peft_batch  # noqa: E402

DART = ROOT.parent / "shared/data/dart"
TEMPLATE = "Triples: {input}\nSentence:"
MAX_NEW_TOKENS = 64
PEFT_VIRTUAL_TOKENS = 20
PEFT_INIT_TEXT = "Write one sentence that states every fact in the triples:"
SCORED = ("bleu", "chrf", "rouge_l")


def read(name: str) -> list[dict]:
    with (DART / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=None, help="a seeded sample (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="default: the job's default length")
    parser.add_argument("--test-rows", type=int, default=None, help="default: all 500")
    parser.add_argument("--sequential-rows", type=int, default=100, help="decoded one at a time")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument(
        "--peft-only",
        action="store_true",
        help="PEFT prompt tuning alone, at the budget the default job would run (--steps, or its default)",
    )
    parser.add_argument("--check-rows", type=int, default=8, help="PEFT decoded by its own generate too")
    args = parser.parse_args()

    train = read("train")
    if args.train_rows:
        random.Random(0).shuffle(train)
        train = train[: args.train_rows]
    test = read("test")[: args.test_rows]
    if args.peft_only:
        backbone = load()
        job_defaults = Hyperparameters()
        kept = _kept(train, seed=job_defaults.seed)
        steps = args.steps or default_steps(len(kept), job_defaults.batch_size)
        peft = run_peft_prompt(
            backbone, kept, test, steps=steps, batch_size=job_defaults.batch_size, check_rows=args.check_rows
        )
        log(f"\n| PEFT prompt tuning, {steps} steps of {job_defaults.batch_size} | " + _cells(peft) + " |")
        return 0
    registry = Registry(load())
    try:
        job, evaluation = run_service(registry, train, test, steps=args.steps)
        sequential = decode_one_at_a_time(registry, test[: args.sequential_rows], evaluation)
    finally:
        registry.close()
    figures = {"job": job, "evaluation": evaluation, "sequential": sequential}
    # The service's figures first: the PEFT run after them takes longer than everything before it.
    log(f"the service's figures: {json.dumps(_service_figures(evaluation))}")
    if not args.skip_peft:
        hp = job["hyperparameters"]
        kept = _kept(train, seed=hp["seed"])
        figures["peft"] = run_peft_prompt(
            registry.backbone,
            kept,
            test,
            steps=hp["steps"],
            batch_size=hp["batch_size"],
            check_rows=args.check_rows,
        )
    report(figures, len(train), len(test))
    return 0


def _kept(train: list[dict], *, seed: int) -> list[Example]:
    """The training rows a job trains on: all but the hold-out it scores prompts on."""
    kept, _ = split_holdout([Example(r["input"], r["output"]) for r in train], seed=seed)
    return kept


def run_service(registry: Registry, train: list[dict], test: list[dict], *, steps: int | None):
    """The default job, then an evaluation of its version beside the bare backbone; the job's figures and
    the evaluation's."""
    training = registry.upload(train, "train.jsonl")
    test_set = registry.upload(test, "test.jsonl")
    log(f"the default job on {len(train)} rows, template {TEMPLATE!r}")
    job = registry.tune(
        task="dart", dataset=training, template=TEMPLATE, **({"steps": steps} if steps else {})
    )
    log(f"job {job['outcome']} in {job['seconds'] / 60:.1f} min: {job['method']}, {job['hyperparameters']}")
    if job["outcome"] != "succeeded":
        raise SystemExit(f"the job did not publish a version: {job['metrics']}")
    evaluation = registry.evaluate(dataset=test_set, models=["dart@1", None], max_new_tokens=MAX_NEW_TOKENS)
    log(f"evaluation {evaluation['outcome']} in {evaluation['seconds']:.0f} s")
    return job, evaluation


def decode_one_at_a_time(registry: Registry, rows: list[dict], evaluation: dict) -> dict:
    """The evaluation's decoding of its first ``rows``, both models, one input at a time: the same greedy
    options, nothing batched. Also how many outputs equal the evaluation's (batching must not change
    them)."""
    tuned = registry.soft_prompt("dart@1")
    options = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
    same = 0
    started = time.perf_counter()
    for row, line in zip(rows, evaluation["predictions"], strict=False):
        text = render(TEMPLATE, row["input"])
        for prompt, prediction in zip((tuned, None), line["predictions"], strict=True):
            alone = generate(registry.backbone, prompts=[prompt], texts=[text], **options)[0].text.strip()
            same += alone == prediction["output"]
    seconds = time.perf_counter() - started
    log(f"one row at a time: {len(rows)} rows x 2 models in {seconds:.0f} s; {same} outputs as batched")
    return {"rows": 2 * len(rows), "seconds": seconds, "same": same}


def run_peft_prompt(
    backbone, train: list[Example], test: list[dict], *, steps: int, batch_size: int, check_rows: int
) -> dict:
    """PEFT prompt tuning by its guide's recipe at the job's budget, then greedy decoding of the test set."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    tokenizer = backbone.tokenizer
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=PEFT_VIRTUAL_TOKENS,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=PEFT_INIT_TEXT,
        tokenizer_name_or_path=str(backbone.model.name_or_path),
    )
    model = get_peft_model(backbone.model, peft_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    config = TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=3e-2, max_grad_norm=1.0, seed=0, optimizer="adamw"
    )
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    batches = BatchOrder(batch_size, len(train), config.seed)
    started = time.perf_counter()
    for step in range(steps):
        batch = [train[i] for i in batches.next()]
        input_ids, attention_mask, labels = peft_batch(tokenizer, batch, end_token=True, template=TEMPLATE)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 10 == 0:
            log(f"  PEFT prompt tuning step {step + 1}/{steps}: loss {loss.item():.3f}")
    train_seconds = time.perf_counter() - started
    model.eval()
    log(f"PEFT prompt tuning: {train_seconds / 60:.1f} min training")
    # PEFT prompt tuning learns input embeddings put in front of the input: a [k, d] soft prompt, which the
    # engine decodes in batches. PEFT's own ``generate`` reuses its cache wrongly after the first token with
    # the transformers installed here (peft#1391: the virtual tokens' text comes back, "WriteWriteWrite");
    # without a cache it is right but recomputes every position at every step, so it only checks the
    # engine's outputs on the first rows.
    learned = model.get_prompt_embedding_to_save(adapter_name="default").detach().float().cpu()
    texts = [render(TEMPLATE, r["input"]) for r in test]
    options = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
    started = time.perf_counter()
    outputs = []
    for start in range(0, len(texts), EVALUATION_CHUNK):
        chunk = texts[start : start + EVALUATION_CHUNK]
        outputs += [
            g.text.strip() for g in generate(backbone, prompts=[learned] * len(chunk), texts=chunk, **options)
        ]
    decode_seconds = time.perf_counter() - started
    scores = generation_report(outputs, [r["references"] for r in test])
    log(
        f"PEFT's prompt decoded by the engine: {len(texts)} inputs in {decode_seconds:.0f} s; "
        + _cells(scores)
    )
    same, check_seconds = _peft_agrees(model, tokenizer, texts[:check_rows], outputs[:check_rows])
    log(f"PEFT's generate, no cache: {same} of {check_rows} outputs the same, {check_seconds:.0f} s")
    return scores  # the times and the check are logged above; the report compares the scores


def _peft_agrees(model, tokenizer, texts: list[str], expected: list[str]) -> tuple[int, float]:
    """How many of ``texts`` PEFT's own greedy ``generate`` continues exactly as ``expected``, and in how
    long: one input at a time, with no padding and no cache, so nothing but PEFT's forward decides the
    tokens."""
    same = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for text, wanted in zip(texts, expected, strict=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            input_ids = torch.tensor([ids])
            produced = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=False,
            )
            same += tokenizer.decode(produced[0, len(ids) :], skip_special_tokens=True).strip() == wanted
    return same, time.perf_counter() - started


def _cells(scores: dict) -> str:
    return " | ".join(f"{scores[m]:.1f}" for m in SCORED)


def _service_figures(evaluation: dict) -> dict:
    return {str(ref): {m: metrics[m] for m in SCORED} for ref, metrics in evaluation["results"].items()}


def report(figures: dict, train_rows: int, test_rows: int) -> None:
    job, evaluation, sequential = figures["job"], figures["evaluation"], figures["sequential"]
    hp, metrics = job["hyperparameters"], job["metrics"]
    log(
        f"\nDART, {train_rows} training rows; the default job: {job['method']}, {job['k']} positions, "
        f"{hp['steps']} steps of {hp['batch_size']}, learning rate {hp['learning_rate']}, "
        f"{job['seconds'] / 60:.1f} min; hold-out ROUGE-L {metrics['val_rouge_l']:.1f} "
        f"(bare {metrics['zero_shot_rouge_l']:.1f}), kept step {metrics['best_step']}"
    )
    log(f"test: {test_rows} inputs, all references; greedy, at most {MAX_NEW_TOKENS} new tokens\n")
    log("| model | BLEU | chrF | ROUGE-L |\n| --- | --- | --- | --- |")
    tuned, bare = evaluation["results"]["dart@1"], evaluation["results"][None]
    rows = [("bare backbone", bare), ("the default job's version", tuned)]
    if "peft" in figures:
        rows.append(("PEFT prompt tuning, same budget", figures["peft"]))
    for name, scores in rows:
        log(f"| {name} | " + _cells(scores) + " |")
    log(f"\nversion - bare: {tuned['bleu'] - bare['bleu']:+.1f} BLEU (target >= +15)")
    if "peft" in figures:
        log(f"version - PEFT prompt tuning: {tuned['bleu'] - figures['peft']['bleu']:+.1f} BLEU (target > 0)")
    row_models = 2 * test_rows
    batched = evaluation["seconds"] / row_models
    one = sequential["seconds"] / sequential["rows"]
    log(
        f"evaluation: {row_models} rows (2 models) in {evaluation['seconds']:.0f} s, {batched:.3f} s a row; "
        f"one row at a time: {one:.3f} s a row ({sequential['rows']} rows); batched is {one / batched:.1f}x "
        f"faster (target >= 5x); {sequential['same']} of {sequential['rows']} outputs the same both ways"
    )
    log(f"sacrebleu: {tuned['signatures']['bleu']}")


if __name__ == "__main__":
    sys.exit(main())
