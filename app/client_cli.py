"""The `softprompt` commands for people using a running service, built on app.client: `datasets`, `tune`,
`jobs`, `eval`, `evals`, `prompts`, `generate`, `classify`, `export`, `import`. The server is SOFTPROMPT_URL
(or --url) and the key SOFTPROMPT_API_KEY (or --key)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from app.client import DEFAULT_URL, ApiError, Client
from app.contract.kinds import FINISHED_STATUSES, InitStrategy, JobStatus, Method
from app.contract.schemas import EvaluationPublic

UrlOption = Annotated[str, typer.Option("--url", envvar="SOFTPROMPT_URL", help="The service's address.")]
KeyOption = Annotated[
    str | None, typer.Option("--key", envvar="SOFTPROMPT_API_KEY", help="API key.", show_default=False)
]
TaskOption = Annotated[
    str | None, typer.Option("--task", help="name or name@version; none: the bare backbone.")
]
console = Console(stderr=True)  # progress and messages; results go to stdout
stdout = Console()

datasets_cli = typer.Typer(help="Labeled datasets.", no_args_is_help=True)
jobs_cli = typer.Typer(help="Tuning jobs.", no_args_is_help=True)
prompts_cli = typer.Typer(help="Tasks and their prompt versions.", no_args_is_help=True)
evals_cli = typer.Typer(help="Evaluations: models compared on a dataset.", no_args_is_help=True)


@contextmanager
def _client(url: str, key: str | None) -> Iterator[Client]:
    """A client whose service errors end the command with the service's own words, exit status 1."""
    try:
        with Client(url, key) as client:
            yield client
    except ApiError as error:
        where = f" (line {error.line})" if error.line else f" ({error.param})" if error.param else ""
        typer.echo(f"error: {error.code}{where}: {error.message}", err=True)
        raise typer.Exit(1) from None
    except httpx.TransportError as error:  # nothing answered: name the address
        typer.echo(f"error: cannot reach {url}: {error}", err=True)
        raise typer.Exit(1) from None


def _json(model: BaseModel | list[BaseModel] | dict[str, Any]) -> None:
    if isinstance(model, list):
        typer.echo(json.dumps([m.model_dump(mode="json") for m in model], indent=2))
    elif isinstance(model, BaseModel):
        typer.echo(model.model_dump_json(indent=2))
    else:
        typer.echo(json.dumps(model, indent=2))


# -- datasets ---------------------------------------------------------------------------------------------


@datasets_cli.command("upload")
def datasets_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help=".jsonl or .csv")],
    name: Annotated[str | None, typer.Option(help="Default: the file's name.")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Upload a dataset; prints its id, size and labels."""
    with _client(url, key) as client:
        dataset = client.upload_dataset(file, name=name)
    labels = f", labels {', '.join(dataset.labels)}" if dataset.labels else ""
    typer.echo(f"dataset {dataset.id}: {dataset.num_examples} {dataset.kind} examples{labels}")


@datasets_cli.command("list")
def datasets_list(url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Your datasets, newest first: id, name, examples, kind."""
    with _client(url, key) as client:
        for d in client.list_datasets(limit=100):
            typer.echo(f"{d.id}\t{d.name}\t{d.num_examples}\t{d.kind}")


# -- tuning -----------------------------------------------------------------------------------------------


def tune(
    task: Annotated[str, typer.Option(help="The task to train a new version of.")],
    dataset: Annotated[int, typer.Option(help="Training dataset id.")],
    template: Annotated[str | None, typer.Option(help="Text around each input, with {input}.")] = None,
    validation_dataset: Annotated[int | None, typer.Option()] = None,
    virtual_tokens: Annotated[int | None, typer.Option(help="Soft prompt length.")] = None,
    method: Annotated[
        Method | None, typer.Option(help="prompt: input embeddings; prefix: keys and values in every layer.")
    ] = None,
    steps: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    start_from: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Start from one of your versions (task@version) instead of a fresh prompt: its method, "
            "length and, unless --template is given, its template.",
        ),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Show live progress until the job ends.")] = False,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Start a tuning job; with --follow, a progress bar (step, loss, ETA) until it ends."""
    hyperparameters = {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate}
    fields = {
        "template": template,
        "validation_dataset": validation_dataset,
        "num_virtual_tokens": virtual_tokens,
        "method": method,
        "init": {"strategy": InitStrategy.VERSION, "from": start_from} if start_from else None,
        "hyperparameters": {k: v for k, v in hyperparameters.items() if v is not None},
    }
    with _client(url, key) as client:
        job = client.create_job(
            task=task, training_dataset=dataset, **{k: v for k, v in fields.items() if v is not None}
        )
        typer.echo(f"job {job.id} queued for task {job.task}")
        if follow:
            _follow(client, job.id)


def _follow(client: Client, job_id: int) -> None:
    """Step, loss and the server's ETA from the job's event stream, then the outcome; exit 1 unless it
    succeeded."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"job {job_id}", total=None, step="-", loss="-", eta="-")
        for event in client.follow_job(job_id):
            data = event.data
            if event.type == "progress":
                eta = data.get("eta_seconds")
                progress.update(
                    bar,
                    completed=data["step"],
                    total=data["total_steps"],
                    step=f"{data['step']}/{data['total_steps']}",
                    loss=f"{data['loss']:.4f}" if data.get("loss") is not None else "-",
                    eta=f"{eta:.0f}s" if eta is not None else "-",
                )
            elif event.type == "status":
                progress.update(bar, description=f"job {job_id} {data.get('status', '')}")
            else:
                progress.console.print(f"{event.type}: {event.message}")
    job = client.get_job(job_id)
    if job.status != JobStatus.SUCCEEDED:
        reason = f": {job.error.code}: {job.error.message}" if job.error else ""
        typer.echo(f"job {job.id} {job.status}{reason}", err=True)
        raise typer.Exit(1)
    metrics, summary = job.metrics, ""
    if metrics.val_accuracy is not None:
        summary = f", validation accuracy {metrics.val_accuracy:.3f}"
        if metrics.zero_shot_accuracy is not None:
            summary += f" (the bare template: {metrics.zero_shot_accuracy:.3f})"
    typer.echo(f"job {job.id} succeeded: {job.result.task}@{job.result.version}{summary}")


@jobs_cli.command("list")
def jobs_list(url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Your jobs, newest first: id, task, status, step."""
    with _client(url, key) as client:
        for j in client.list_jobs(limit=100):
            typer.echo(f"{j.id}\t{j.task}\t{j.status}\t{j.progress.step}/{j.progress.total_steps}")


@jobs_cli.command("show")
def jobs_show(job_id: int, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """A job as JSON."""
    with _client(url, key) as client:
        _json(client.get_job(job_id))


@jobs_cli.command("follow")
def jobs_follow(job_id: int, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Live progress of a job until it ends."""
    with _client(url, key) as client:
        _follow(client, job_id)


@jobs_cli.command("cancel")
def jobs_cancel(job_id: int, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Cancel a queued or running job."""
    with _client(url, key) as client:
        typer.echo(f"job {job_id} {client.cancel_job(job_id).status}")


# -- evaluations ------------------------------------------------------------------------------------------

# What a model argument may say for the bare backbone (the API's null), and how a table names it.
BARE = ("bare", "-")
# The figures a comparison shows, in the order people read them, when present; the nested ones (per_label,
# confusion_matrix, signatures) are left to `evals show --json` and the predictions file.
METRICS = ("accuracy", "macro_f1", "bleu", "chrf", "rouge_l", "exact_match", "f1")
# Classification figures are fractions; generation figures are on sacrebleu's 0-100 scale.
FRACTIONS = ("accuracy", "macro_f1")


def eval_(
    dataset: Annotated[int, typer.Argument(help="Id of the dataset to score.")],
    models: Annotated[
        list[str],
        typer.Argument(help="task@version, task (its newest version), or bare (or -): the backbone."),
    ],
    template: Annotated[
        str | None, typer.Option(help="The bare backbone's template; default: the first task's.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation: the longest answer (64).")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress, then the metrics side by side.")] = True,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Compare models on a dataset: a progress bar, then a table with one column per model."""
    fields = {"template": template, "max_new_tokens": max_new_tokens}
    with _client(url, key) as client:
        evaluation = client.create_evaluation(
            dataset=dataset,
            models=[None if m in BARE else m for m in models],
            **{k: v for k, v in fields.items() if v is not None},
        )
        typer.echo(f"evaluation {evaluation.id} queued: {', '.join(_model_names(evaluation))}")
        if wait:
            _finish(_wait(client, evaluation.id))


def _wait(client: Client, evaluation_id: int) -> EvaluationPublic:
    """A bar of rows scored (over all models) until the evaluation ends; the finished evaluation."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("rows {task.fields[rows]}"))
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"evaluation {evaluation_id}", total=None, rows="-")
        for evaluation in client.follow_evaluation(evaluation_id):
            done, total = evaluation.progress.done, evaluation.progress.total
            progress.update(
                bar,
                description=f"evaluation {evaluation_id} {evaluation.status}",
                completed=done,
                total=total or None,
                rows=f"{done}/{total}",
            )
    return evaluation


def _finish(evaluation: EvaluationPublic) -> None:
    """The metrics table of a succeeded evaluation; otherwise what happened, and exit 1."""
    if evaluation.status != JobStatus.SUCCEEDED:
        typer.echo(_describe(evaluation), err=True)
        raise typer.Exit(1)
    _show(evaluation)


def _show(evaluation: EvaluationPublic) -> None:
    typer.echo(_describe(evaluation))
    if evaluation.status == JobStatus.SUCCEEDED:
        stdout.print(_comparison(evaluation))


def _describe(evaluation: EvaluationPublic) -> str:
    line = f"evaluation {evaluation.id} {evaluation.status} on dataset {evaluation.dataset or '-'}"
    if evaluation.error:
        return f"{line}: {evaluation.error.code}: {evaluation.error.message}"
    if evaluation.status not in FINISHED_STATUSES:
        return f"{line}: {evaluation.progress.done}/{evaluation.progress.total} rows"
    return line


def _model_names(evaluation: EvaluationPublic) -> list[str]:
    return [r.model or BARE[0] for r in evaluation.results]


def _metric_names(evaluation: EvaluationPublic) -> list[str]:
    """The plain numbers among the results' metrics: the known ones in METRICS order, then any other."""
    present = {
        name
        for result in evaluation.results
        for name, value in (result.metrics or {}).items()
        if isinstance(value, int | float)
    }
    return [m for m in METRICS if m in present] + sorted(present - set(METRICS))


def _figure(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if name in FRACTIONS else f"{value:.2f}"


def _comparison(evaluation: EvaluationPublic) -> Table:
    """One row per metric, one column per model; the best figure of a row in bold (on a terminal)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("metric")
    for name in _model_names(evaluation):
        table.add_column(name, justify="right")
    for name in _metric_names(evaluation):
        values = [(r.metrics or {}).get(name) for r in evaluation.results]
        best = max((v for v in values if v is not None), default=None)
        table.add_row(
            name, *(f"[bold]{_figure(name, v)}[/]" if v == best else _figure(name, v) for v in values)
        )
    return table


def _headline(evaluation: EvaluationPublic) -> str:
    """The first metric of the comparison for each model, 'accuracy 0.850/0.500', or '-'."""
    names = _metric_names(evaluation)
    if not names:
        return "-"
    values = [_figure(names[0], (r.metrics or {}).get(names[0])) for r in evaluation.results]
    return f"{names[0]} {'/'.join(values)}"


@evals_cli.command("list")
def evals_list(
    task: Annotated[str | None, typer.Option(help="Only those including a version of this task.")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Your evaluations, newest first: id, status, dataset, models, rows, the first metric of each model."""
    with _client(url, key) as client:
        for e in client.list_evaluations(limit=100, task=task):
            progress = f"{e.progress.done}/{e.progress.total}"
            models = ",".join(_model_names(e))
            typer.echo(f"{e.id}\t{e.status}\t{e.dataset or '-'}\t{models}\t{progress}\t{_headline(e)}")


@evals_cli.command("show")
def evals_show(
    evaluation_id: int,
    as_json: Annotated[bool, typer.Option("--json", help="The whole evaluation as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """An evaluation's status and, once it succeeded, its metrics side by side."""
    with _client(url, key) as client:
        evaluation = client.get_evaluation(evaluation_id)
    if as_json:
        _json(evaluation)
    else:
        _show(evaluation)


@evals_cli.command("follow")
def evals_follow(evaluation_id: int, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Progress of an evaluation until it ends, then its metrics side by side."""
    with _client(url, key) as client:
        _finish(_wait(client, evaluation_id))


@evals_cli.command("cancel")
def evals_cancel(evaluation_id: int, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Cancel a queued or running evaluation."""
    with _client(url, key) as client:
        typer.echo(f"evaluation {evaluation_id} {client.cancel_evaluation(evaluation_id).status}")


@evals_cli.command("predictions")
def evals_predictions(
    evaluation_id: int,
    output: Annotated[Path, typer.Option("--output", "-o", help="Default: evaluation-ID.jsonl")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Save a succeeded evaluation's predictions: one JSON line per row, each model's output and scores."""
    with _client(url, key) as client:
        data = client.download_predictions(evaluation_id)
    target = output or Path(f"evaluation-{evaluation_id}.jsonl")
    target.write_bytes(data)
    rows = len(data.splitlines())  # the last line has no newline of its own
    typer.echo(f"wrote {target} ({rows} rows)")


# -- prompts and inference --------------------------------------------------------------------------------


@prompts_cli.command("list")
def prompts_list(url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Your tasks: name, newest version, its validation accuracy."""
    with _client(url, key) as client:
        for t in client.list_tasks():
            newest = t.versions[-1] if t.versions else None
            accuracy = newest.metrics.get("val_accuracy") if newest else None
            typer.echo(f"{t.name}\t{t.latest_version or '-'}\t{accuracy if accuracy is not None else '-'}")


@prompts_cli.command("show")
def prompts_show(task: str, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """A task and its newest versions as JSON."""
    with _client(url, key) as client:
        _json(client.get_task(task))


@prompts_cli.command("versions")
def prompts_versions(task: str, url: UrlOption = DEFAULT_URL, key: KeyOption = None) -> None:
    """Every version of a task, newest first: version, method, created, validation accuracy, and the version
    it started from (its parent) if it did."""
    with _client(url, key) as client:
        for v in client.list_versions(task):
            accuracy = v.metrics.get("val_accuracy")
            shown = accuracy if accuracy is not None else "-"
            typer.echo(
                f"{v.version}\t{v.method.value}\t{v.created_at:%Y-%m-%d %H:%M}\t{shown}\t{v.parent or '-'}"
            )


def generate(
    text: Annotated[list[str], typer.Argument(help="One or more inputs, run as one batch.")],
    task: TaskOption = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option()] = 0.0,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Generate with a task's prompt; one output per line."""
    with _client(url, key) as client:
        answer = client.generate(task, text, max_new_tokens=max_new_tokens, temperature=temperature)
    for output in answer.outputs:
        typer.echo(output.text)


def classify(
    text: Annotated[list[str], typer.Argument(help="One or more inputs, run as one batch.")],
    task: TaskOption = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated; default: the task's.")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Classify each input: label, then its probability, per line."""
    with _client(url, key) as client:
        answer = client.classify(task, text, labels=labels.split(",") if labels else None)
    for result in answer.results:
        typer.echo(f"{result.label}\t{result.scores[result.label]:.4f}")


def export(
    task: str,
    version: int,
    output: Annotated[Path, typer.Option("--output", "-o", help="Default: TASK-vVERSION-peft.zip")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Save a version as a PEFT prompt-tuning adapter (zip)."""
    with _client(url, key) as client:
        data = client.export_peft(task, version)
    target = output or Path(f"{task}-v{version}-peft.zip")
    target.write_bytes(data)
    typer.echo(f"wrote {target} ({len(data)} bytes)")


def import_(
    task: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A PEFT adapter zip.")],
    template: Annotated[str | None, typer.Option(help="Default: the zip's own.")] = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels, for classification.")] = None,
    url: UrlOption = DEFAULT_URL,
    key: KeyOption = None,
) -> None:
    """Add a PEFT prompt-tuning adapter as the task's next version."""
    with _client(url, key) as client:
        version = client.import_peft(
            task, file, template=template, labels=labels.split(",") if labels else None
        )
    typer.echo(f"imported {task}@{version.version}")


def register(cli: typer.Typer) -> None:
    cli.add_typer(datasets_cli, name="datasets")
    cli.add_typer(jobs_cli, name="jobs")
    cli.add_typer(prompts_cli, name="prompts")
    cli.add_typer(evals_cli, name="evals")
    cli.command()(tune)
    cli.command("eval")(eval_)
    cli.command()(generate)
    cli.command()(classify)
    cli.command()(export)
    cli.command("import")(import_)
