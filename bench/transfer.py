"""Transfer between tasks: a soft prompt learned on a mixture of other tasks as the start of a target task's
job (init strategy "version"), against the default start (the label words), over several seeds.

    .venv/bin/python bench/transfer.py                                  # SST-2, CR and subj as targets
    .venv/bin/python bench/transfer.py --targets sst2 --seeds 0         # one target, one seed: a first look
    .venv/bin/python bench/transfer.py --budgets small large            # and the larger budget
    .venv/bin/python bench/transfer.py --targets sst2 --sources cr mpqa # a source of the sentiment tasks only

For each target, a source prompt is trained on a mixture of the training rows of every other task (SST-2
and the six of ../shared/data/TASKS.md; --sources names fewer), each capped at --cap rows so that none
dominates (T5's examples-proportional mixing with a cap), each row in its own task's wording ("Review:
…\\nSentiment:" followed by " positive"), as a generation job with the default method and length would
train on it. A source prompt is kept under .cache/transfer by its recipe, and a later run with the same
recipe reads it instead of training it. Then, per seed and budget, the target's job from the default start
and from the source prompt:

- small: --train-rows target rows sampled once (400), 60 steps of 8 (bench/small_data.py's job);
- large: --large-rows target rows, the job's own default steps and batch.

Everything else is the job's: its seeded hold-out, the method's learning rate, the start as the fallback
and the bare-template rule (a job that would publish nothing leaves the user with the bare template, and
is scored so). The target's test split (SST-2: the first --test-rows dev rows) is read once per finished
job, after training; nothing is chosen on it. A third row, "chosen on the hold-out", is what a team gets
that runs both jobs with the same seed (so the same hold-out rows) and keeps the one whose hold-out score
is higher, the label-word start on a tie: it trains nothing more.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.hyperparameters import DEFAULT_METHOD, METHOD_DEFAULTS, Hyperparameters  # noqa: E402
from app.contract.kinds import EvalMetric, InitStrategy, Method  # noqa: E402
from app.ml.backbone import Backbone  # noqa: E402
from app.ml.prefix import init_prefix  # noqa: E402
from app.ml.soft_prompt import init_prompt  # noqa: E402
from app.ml.text import render  # noqa: E402
from app.ml.trainer import Example, TrainConfig, train_prompt  # noqa: E402
from app.services.tuning.training import split_holdout  # noqa: E402
from bench.tuning import accuracy as rank_accuracy  # noqa: E402
from bench.tuning import load, log  # noqa: E402

DATA = ROOT.parent / "shared/data"
SOURCES = ROOT / ".cache/transfer"  # source prompts already trained, by recipe: a rerun reuses them


@dataclass(frozen=True)
class Task:
    name: str
    template: str  # the task's own wording, with {input}
    labels: tuple[str, str]
    test_file: str = "test"


TASKS = {
    task.name: task
    for task in (
        Task("sst2", "Review: {input}\nSentiment:", ("negative", "positive"), test_file="dev"),
        Task("cr", "Customer review: {input}\nSentiment:", ("negative", "positive")),
        Task("mpqa", "Phrase: {input}\nPolarity:", ("negative", "positive")),
        Task("subj", "Sentence: {input}\nSubjective or objective?", ("subjective", "objective")),
        Task("cola", "Sentence: {input}\nGrammatically acceptable?", ("unacceptable", "acceptable")),
        Task("mrpc", "{input}\nSame meaning?", ("different", "equivalent")),
        Task("qnli", "{input}\nDoes the sentence answer the question?", ("no", "yes")),
    )
}


def examples(task: Task, split: str) -> list[Example]:
    with (DATA / task.name / f"{split}.jsonl").open() as f:
        return [Example(r["text"], r["label"]) for r in map(json.loads, f)]


def source_tasks(target: str, only: list[str] | None) -> list[str]:
    """The tasks a source for ``target`` learns from: ``only`` (all others when None), never the target."""
    return [name for name in (only or TASKS) if name != target]


def mixture(names: list[str], *, cap: int, seed: int) -> list[Example]:
    """The named tasks' training rows, at most ``cap`` of each, in each one's own wording: the input is the
    rendered template and the output the label word, as a generation dataset's {"input", "output"}."""
    rows: list[Example] = []
    for task in map(TASKS.get, names):
        own = examples(task, "train")
        random.Random(seed).shuffle(own)
        rows += [Example(render(task.template, ex.input), ex.output) for ex in own[:cap]]
    random.Random(seed).shuffle(rows)
    return rows


def fresh_start(backbone: Backbone, method: Method, *, labels: list[str], seed: int) -> torch.Tensor:
    make = init_prefix if method == Method.PREFIX else init_prompt
    k = METHOD_DEFAULTS[method].num_virtual_tokens
    return make(backbone, num_virtual_tokens=k, strategy=InitStrategy.LABELS, labels=labels, seed=seed)


def train_source(backbone: Backbone, rows: list[Example], *, method: Method, steps: int) -> torch.Tensor:
    """The source prompt: a generation job on the mixture (its outputs are the label words), started from
    frequent vocabulary as such a job starts."""
    kept, held = split_holdout(rows, seed=0)
    hp = Hyperparameters(steps=steps, batch_size=16).resolve(
        len(kept), max_steps=100_000, method=method, classification=False
    )
    make = init_prefix if method == Method.PREFIX else init_prompt
    start = make(
        backbone,
        num_virtual_tokens=METHOD_DEFAULTS[method].num_virtual_tokens,
        strategy=InitStrategy.VOCAB,
        seed=0,
    )
    # Decoding the hold-out at every evaluation is what a generation job does; the loss is enough here.
    config = TrainConfig.of(hp.model_copy(update={"eval_metric": EvalMetric.LOSS}), classification=False)
    result = train_prompt(
        backbone,
        prompt=start,
        train=kept,
        validation=held[:100],
        template="{input}",
        labels=None,
        config=config,
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    log(f"    source: {hp.steps} steps of {hp.batch_size}, hold-out loss {result.metrics['val_loss']:.3f}")
    return result.prompt.detach()


def source_prompt(
    backbone: Backbone, target: str, *, only: list[str] | None, cap: int, steps: int, method: Method
) -> torch.Tensor:
    """The source prompt for ``target`` (from the tasks ``only``, or all the others), read from SOURCES when
    this recipe was trained before."""
    names = source_tasks(target, only)
    if not names:
        raise SystemExit(f"{target}: --sources names no task but the target itself")
    mix = f"without-{target}" if only is None else "from-" + "-".join(sorted(names))
    path = SOURCES / f"{mix}-cap{cap}-steps{steps}-{method.value}.safetensors"
    if path.exists():
        log(f"{target}: source prompt read from {path.relative_to(ROOT)}")
        return load_file(path)["prompt"]
    rows = mixture(names, cap=cap, seed=0)
    log(f"{target}: source prompt on {len(rows)} rows of {', '.join(names)} (at most {cap} each)")
    began = time.perf_counter()
    prompt = train_source(backbone, rows, method=method, steps=steps)
    log(f"    {time.perf_counter() - began:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompt": prompt.contiguous()}, path)
    return prompt


def accuracy(backbone: Backbone, task: Task, prompt: torch.Tensor | None, rows: list[Example]) -> float:
    return rank_accuracy(backbone, prompt, rows, template=task.template, labels=list(task.labels))


def target_job(
    backbone: Backbone, task: Task, sample: list[Example], start: torch.Tensor, *, given: dict, seed: int
) -> tuple[torch.Tensor | None, dict]:
    """The target's job from ``start``: the published prompt (None when the job would publish nothing)
    and its metrics."""
    kept, held = split_holdout(sample, seed=seed)
    hp = Hyperparameters(**given, seed=seed).resolve(
        len(kept), max_steps=10_000, method=DEFAULT_METHOD, classification=True
    )
    result = train_prompt(
        backbone,
        prompt=start.clone(),
        train=kept,
        validation=held,
        template=task.template,
        labels=list(task.labels),
        config=TrainConfig.of(hp, classification=True),
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    published = result.versus_bare is None or not result.versus_bare.worse
    return (result.prompt if published else None), {**result.metrics, "steps": hp.steps}


@dataclass(frozen=True)
class Scored:
    test: float  # accuracy on the target's test rows, read once the job finished
    holdout: float  # the hold-out's score of what the user is left with (the bare template if nothing)
    prompt: torch.Tensor | None  # the published prompt; None: nothing published, the bare template was scored


def scored_job(
    backbone: Backbone,
    task: Task,
    sample: list[Example],
    start: torch.Tensor,
    test: list[Example],
    *,
    given: dict,
    seed: int,
    label: str,
) -> Scored:
    """One target job given ``given`` hyperparameters, scored on ``test`` after it finished."""
    began = time.perf_counter()
    prompt, metrics = target_job(backbone, task, sample, start, given=given, seed=seed)
    scored = accuracy(backbone, task, prompt, test)
    log(
        f"  {label}: {metrics['steps']} steps, hold-out {metrics['val_accuracy']:.3f} "
        f"(bare {metrics['zero_shot_accuracy']:.3f}, kept step {metrics['best_step']}), "
        f"{'published' if prompt is not None else 'NOT published'}; test {scored:.3f}; "
        f"{time.perf_counter() - began:.0f} s"
    )
    holdout = metrics["val_accuracy"] if prompt is not None else metrics["zero_shot_accuracy"]
    return Scored(test=scored, holdout=holdout, prompt=prompt)


def chosen(default: Scored, transfer: Scored) -> Scored:
    """The version a team keeps when it runs a job from each start and compares them as the API shows them:
    the better on the hold-out, the label-word start on a tie (nothing on the test rows is looked at)."""
    return transfer if transfer.holdout > default.holdout else default


BUDGETS = {"small": {"steps": 60, "batch_size": 8}, "large": {}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TASKS), default=["sst2", "cr", "subj"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=["small"])
    parser.add_argument("--train-rows", type=int, default=400, help="target rows at the small budget")
    parser.add_argument("--large-rows", type=int, default=1200, help="target rows at the large budget")
    parser.add_argument(
        "--sources", nargs="+", choices=list(TASKS), help="the source mixture's tasks (all but the target)"
    )
    parser.add_argument("--cap", type=int, default=500, help="rows of each source task in a mixture")
    parser.add_argument("--source-steps", type=int, default=300, help="steps of 16 for a source prompt")
    parser.add_argument("--test-rows", type=int, default=200)
    args = parser.parse_args()

    backbone = load()
    method = DEFAULT_METHOD
    table: list[tuple[str, str, str, list[float]]] = []
    for name in args.targets:
        task = TASKS[name]
        source = source_prompt(
            backbone, name, only=args.sources, cap=args.cap, steps=args.source_steps, method=method
        )
        pool = examples(task, "train")
        random.Random(0).shuffle(pool)
        test = examples(task, task.test_file)[: args.test_rows]
        for budget in args.budgets:
            size = args.train_rows if budget == "small" else args.large_rows
            sample = pool[:size]
            runs: dict[str, list[Scored]] = {"default": [], "transfer": []}
            for start_name, runs_of_start in runs.items():
                for seed in args.seeds:
                    if start_name == "default":
                        start = fresh_start(backbone, method, labels=list(task.labels), seed=seed)
                    else:
                        start = source
                    label = f"{name} {budget} ({size} rows) {start_name} seed {seed}"
                    given = BUDGETS[budget]
                    runs_of_start.append(
                        scored_job(backbone, task, sample, start, test, given=given, seed=seed, label=label)
                    )
            runs["chosen on the hold-out"] = list(map(chosen, runs["default"], runs["transfer"]))
            for start_name, scored in runs.items():
                table.append((name, budget, start_name, [s.test for s in scored]))
        bare = accuracy(backbone, task, None, test)
        log(f"  {name}: bare template on the test rows {bare:.3f}")

    log("\n| target | budget | start | test accuracy per seed | mean |")
    log("| --- | --- | --- | --- | --- |")
    for name, budget, start_name, scores in table:
        shown = ", ".join(f"{s:.3f}" for s in scores)
        log(f"| {name} | {budget} | {start_name} | {shown} | {statistics.mean(scores):.3f} |")
    means = {(name, budget, start): statistics.mean(scores) for name, budget, start, scores in table}
    for start_name in ("transfer", "chosen on the hold-out"):
        gains = [
            mean - means[name, budget, "default"]
            for (name, budget, s), mean in means.items()
            if s == start_name
        ]
        log(f"{start_name} minus default start, mean over the rows above: {statistics.mean(gains):+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
