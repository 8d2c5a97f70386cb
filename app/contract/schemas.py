"""Request and response bodies. Response models are built from the ORM rows in one place each (``of``),
which read the rows' attributes: the ORM classes are named for the type checker alone, so the client
imports this without the database layer."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.contract.hyperparameters import DEFAULT_METHOD, Hyperparameters, per_method
from app.contract.kinds import MAX_ID, DatasetKind, EvalMetric, InitStrategy, JobStatus, Method

if TYPE_CHECKING:
    from app.db.models import Evaluation, PromptVersion, Task, TuningJob


class ErrorBody(BaseModel):
    code: str = Field(examples=["dataset_invalid"])
    message: str = Field(examples=["Line 3: invalid JSON (Expecting ',' delimiter: column 18)."])
    param: str | None = Field(default=None, examples=["label"])
    line: int | None = Field(default=None, examples=[3])


class ErrorResponse(BaseModel):
    error: ErrorBody


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool


# -- datasets ---------------------------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    """A dataset as the API shows it: the row's own fields, read by name (``model_validate(row)``)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    filename: str
    format: Literal["jsonl", "csv"]
    kind: DatasetKind
    num_examples: int
    labels: list[str] | None
    stats: dict[str, Any]
    sha256: str
    created_at: datetime


# -- metadata of runs ----------------------------------------------------------------------------------------

# A job's or an evaluation's own key-value pairs, with OpenAI's limits for a fine-tuning job's metadata.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=METADATA_KEY_CHARS)],
        Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS)],
    ],
    Field(
        max_length=METADATA_PAIRS,
        description=f"Up to {METADATA_PAIRS} pairs of your own (keys of 1-{METADATA_KEY_CHARS} characters, "
        f"values of at most {METADATA_VALUE_CHARS}), returned with the run; lists filter on them with "
        "?metadata[key]=value.",
    ),
]


# -- tuning jobs ------------------------------------------------------------------------------------------


class InitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    strategy: InitStrategy = Field(
        description="labels, text, vocab: from those tokens (a prefix: the keys and values they leave); "
        "random; zero (prefix only); version: as the version named by `from` is."
    )
    text: str | None = Field(default=None, max_length=10_000)
    source: str | None = Field(
        default=None,
        alias="from",
        max_length=200,
        description="With strategy version: one of your versions, task@version ('sst2@3'; 'sst2' is its "
        "newest, fixed when the job is created). Same base model and method as the job; the job takes its "
        "number of virtual tokens, and its template unless the job names one.",
    )

    def stored(self) -> dict[str, str]:
        """As a job stores it: the fields given, ``from`` by that name."""
        return self.model_dump(exclude_none=True, by_alias=True)


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "task": "sst2",
                    "training_dataset": 1,
                    "template": "Review: {input}\nSentiment:",
                    "hyperparameters": {"steps": 60, "batch_size": 8},
                }
            ]
        },
    )

    task: str = Field(
        description="Name of the prompt this job trains: [a-z0-9][a-z0-9_-]{0,63}.",
        min_length=1,
        max_length=64,
    )
    training_dataset: int = Field(strict=True, ge=1, le=MAX_ID, description="Id of an uploaded dataset.")
    validation_dataset: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_ID,
        description="Id of a dataset to evaluate on; default: a held-out slice of training.",
    )
    base_model: str | None = Field(
        default=None, description="A registered backbone; default: the service's default backbone."
    )
    method: Method | None = Field(
        default=None,
        description="prompt: input embeddings in front of the input (prompt tuning); prefix: keys and "
        f"values in every layer (prefix tuning, P-tuning v2). Default: the start version's (init strategy "
        f"version), else {DEFAULT_METHOD.value}, which measured best on small and large SST-2 training sets.",
    )
    num_virtual_tokens: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        description="Length of the soft prompt. Default: the start version's (init strategy version), else "
        f"{per_method('num_virtual_tokens')}.",
    )
    template: str | None = Field(
        default=None,
        description="Text around each input, with {input} once; stored with the prompt "
        "and applied at inference. At most 10,000 characters (SOFTPROMPT_MAX_TEMPLATE_CHARS). Default: the "
        "start version's (init strategy version), else '{input}'.",
    )
    init: InitSpec | None = Field(
        default=None, description="Default: 'labels' for classification datasets, 'vocab' otherwise."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    metadata: Metadata | None = None


class Progress(BaseModel):
    step: int
    total_steps: int
    eta_seconds: float | None


class LabelMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class VersusBare(BaseModel):
    """The kept prompt against the bare template on the same hold-out rows, by `metric`: the rows each
    scored better, and a one-sided exact sign test of the bare template's lead. `worse` (p_value under
    refuse_below_p) is the verdict that refuses to publish."""

    test: str
    metric: EvalMetric
    rows: int
    prompt_better: int
    bare_better: int
    p_value: float
    refuse_below_p: float
    worse: bool


class JobMetrics(BaseModel):
    """Of the prompt that was kept (the best evaluated one); zero-shot is the bare backbone with the same
    template on the same validation rows."""

    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_macro_f1: float | None = None
    val_per_label: dict[str, LabelMetrics] | None = None
    zero_shot_accuracy: float | None = None
    zero_shot_macro_f1: float | None = None
    zero_shot_val_loss: float | None = None
    # Generation: the greedy outputs of the hold-out, scored as evaluations score them (0-100).
    val_exact_match: float | None = None
    val_f1: float | None = None
    val_bleu: float | None = None
    val_chrf: float | None = None
    val_rouge_l: float | None = None
    zero_shot_exact_match: float | None = None
    zero_shot_f1: float | None = None
    zero_shot_bleu: float | None = None
    zero_shot_chrf: float | None = None
    zero_shot_rouge_l: float | None = None
    eval_metric: EvalMetric | None = Field(
        default=None, description="The hold-out metric that chose the kept prompt."
    )
    zero_shot_test: VersusBare | None = Field(
        default=None, description="Whether the bare template is better beyond the hold-out's noise."
    )
    best_step: int | None = None
    stopped_early: bool | None = None


class JobResult(BaseModel):
    task: str
    version: int


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: int
    task: str
    status: JobStatus
    training_dataset: int | None
    validation_dataset: int | None
    base_model: str
    method: Method
    num_virtual_tokens: int
    template: str
    init: dict[str, Any]
    hyperparameters: dict[str, Any]  # as stored: Hyperparameters, resolved for the data
    progress: Progress
    metrics: JobMetrics
    result: JobResult | None
    error: JobError | None
    attempts: int
    metadata: dict[str, str] | None = None  # None also from a server older than metadata
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: TuningJob) -> JobPublic:
        hyperparameters = Hyperparameters.model_validate(row.hyperparameters)
        return cls(
            id=row.id,
            task=row.task,
            status=row.status,
            training_dataset=row.training_dataset_id,
            validation_dataset=row.validation_dataset_id,
            base_model=row.base_model,
            method=row.method,
            num_virtual_tokens=row.num_virtual_tokens,
            template=row.template,
            init=row.init,
            hyperparameters=row.hyperparameters,
            progress=Progress(
                **{
                    "step": 0,
                    "total_steps": hyperparameters.steps,
                    "eta_seconds": None,
                    **row.progress,
                }
            ),
            metrics=JobMetrics(**row.metrics),
            result=JobResult(task=row.task, version=row.result_version) if row.result_version else None,
            error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
            attempts=row.attempts,
            metadata=row.client_metadata,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


# -- evaluations ------------------------------------------------------------------------------------------


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"dataset": 2, "models": ["sst2@3", "sst2@2", None]}]},
    )

    dataset: int = Field(
        strict=True, ge=1, le=MAX_ID, description="Id of an uploaded dataset to score the models on."
    )
    models: list[str | None] = Field(
        min_length=1,
        description="The models to compare, in order: 'task@3' (a version), 'task' (its newest version, "
        "pinned when the evaluation is created) or null (the bare backbone). At most 8 "
        "(SOFTPROMPT_MAX_EVALUATION_MODELS).",
    )
    template: str | None = Field(
        default=None,
        description="The bare backbone's template, with {input} once; default: the first named task's. "
        "A version always uses its own.",
    )
    max_new_tokens: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        description="Generation: greedy decoding stops at the end of the answer or after this many tokens "
        "(default 64).",
    )
    metadata: Metadata | None = None


class EvaluationProgress(BaseModel):
    done: int = Field(description="Rows scored so far, over all models.")
    total: int


class EvaluationResult(BaseModel):
    model: str | None = Field(description="'task@3', or null for the bare backbone.")
    metrics: dict[str, Any] | None = Field(
        description="Once succeeded. Classification: accuracy, macro_f1, per_label, confusion_matrix; "
        "generation: exact_match, f1, bleu, chrf, rouge_l (0-100) and sacrebleu's signatures."
    )


class EvaluationPublic(BaseModel):
    id: int
    status: JobStatus
    dataset: int | None
    kind: str
    base_model: str
    template: str
    max_new_tokens: int
    progress: EvaluationProgress
    results: list[EvaluationResult]
    error: JobError | None
    attempts: int
    metadata: dict[str, str] | None = None  # None also from a server older than metadata
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: Evaluation) -> EvaluationPublic:
        return cls(
            id=row.id,
            status=row.status,
            dataset=row.dataset_id,
            kind=row.kind,
            base_model=row.base_model,
            template=row.template,
            max_new_tokens=row.max_new_tokens,
            progress=EvaluationProgress(**{"done": 0, "total": 0, **row.progress}),
            results=[EvaluationResult(model=m.reference, metrics=m.metrics) for m in row.models],
            error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
            attempts=row.attempts,
            metadata=row.client_metadata,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobEventPublic(BaseModel):
    id: int
    type: str
    message: str
    data: dict[str, Any]
    created_at: datetime


# -- prompts ----------------------------------------------------------------------------------------------


class VersionPublic(BaseModel):
    task: str
    version: int
    base_model: str
    method: Method
    num_virtual_tokens: int
    embedding_dim: int
    template: str
    labels: list[str] | None
    kind: str
    sha256: str
    source_job: int | None
    source_dataset: int | None
    parent: str | None = Field(
        default=None,
        description="The version this one's job started from (init strategy version), task@version.",
    )
    metrics: dict[str, Any]
    evaluations: list[int] | None = Field(
        default=None, description="Ids of the evaluations that include this version (on GET of one version)."
    )
    created_at: datetime

    @classmethod
    def of(cls, row: PromptVersion, task: str, *, evaluations: list[int] | None = None) -> VersionPublic:
        return cls(
            task=task,
            version=row.version,
            base_model=row.base_model,
            method=row.method,
            num_virtual_tokens=row.num_virtual_tokens,
            embedding_dim=row.embedding_dim,
            template=row.template,
            labels=row.labels,
            kind=row.kind,
            sha256=row.sha256,
            source_job=row.source_job_id,
            source_dataset=row.source_dataset_id,
            parent=row.parent,
            metrics=row.metrics,
            evaluations=evaluations,
            created_at=row.created_at,
        )


# A task shows at most this many of its versions, the newest: a task may have thousands.
TASK_VERSIONS_SHOWN = 20


class TaskPublic(BaseModel):
    id: int = Field(description="The cursor of GET /v1/prompts: pass the last one as `after`.")
    name: str
    latest_version: int | None
    versions: list[VersionPublic] = Field(
        description=f"The newest {TASK_VERSIONS_SHOWN} versions at most, oldest first; "
        "GET /v1/prompts/{task}/versions pages through them all."
    )
    version_count: int = Field(description="How many versions the task has in all.")
    created_at: datetime

    @classmethod
    def of(cls, row: Task, versions: list[PromptVersion], count: int) -> TaskPublic:
        shown = [VersionPublic.of(v, row.name) for v in versions]
        return cls(
            id=row.id,
            name=row.name,
            latest_version=shown[-1].version if shown else None,
            versions=shown,
            version_count=count,
            created_at=row.created_at,
        )


# -- inference --------------------------------------------------------------------------------------------

TASK_DESCRIPTION = "'name' (newest version), 'name@3' (pinned), or null for the bare backbone."


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "sst2", "input": "a gorgeous, witty, seductive movie.", "max_new_tokens": 8}
            ]
        },
    )

    task: str | None = Field(default=None, description=TASK_DESCRIPTION)
    input: str | list[str] = Field(description="One input or a list, run as one batch.")
    max_new_tokens: int = Field(default=64, strict=True, ge=1)
    temperature: float = Field(
        default=0.0, ge=0, le=5, description="0 (and anything below 1e-4) is greedy decoding."
    )
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] | None = Field(
        default=None, description="Up to 4 strings (SOFTPROMPT_MAX_STOP_STRINGS) of up to 256 characters."
    )
    seed: int | None = Field(default=None, strict=True, ge=0, le=2**31 - 1)
    stream: bool = False


class GenerationOut(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str | None
    version: int | None
    outputs: list[GenerationOut]
    usage: Usage


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"task": "sst2", "input": ["a gorgeous, witty, seductive movie.", "dull and lifeless"]}
            ]
        },
    )

    task: str | None = Field(default=None, description=TASK_DESCRIPTION)
    input: str | list[str]
    labels: list[str] | None = Field(
        default=None,
        description="Candidates; default: the prompt's label set. Up to 256 labels (SOFTPROMPT_MAX_LABELS) "
        "of up to 32 tokens each.",
    )


class ClassifyResult(BaseModel):
    label: str
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    task: str | None
    version: int | None
    results: list[ClassifyResult]
    usage: Usage
