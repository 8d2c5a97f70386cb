"""Bodies in the shapes of OpenAI's API, as far as this service can honour them. Fields OpenAI has and we
do not are refused by name (extra="forbid") instead of being ignored; a few that clients send with their
neutral value by habit are accepted with that value only (see `neutral_only`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.contract.hyperparameters import Hyperparameters, per_method
from app.contract.kinds import JobStatus
from app.contract.schemas import InitSpec, Metadata


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListOf(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False


# -- files ------------------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"  # a file is parsed and checked whole before it is stored


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# -- fine-tuning ------------------------------------------------------------------------------------------


# OpenAI's "auto" means our default, as absent does; it arrives in the handlers as None. (A union with
# Literal["auto"] would name its branches in a refusal's `param`: "n_epochs.literal['auto']".)
AUTO_IS_NONE = BeforeValidator(lambda value: None if value == "auto" else value)
JSON_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum"}


def auto_or(json_type: str, **bounds: float) -> Any:
    number = {"type": json_type, **{JSON_BOUNDS[k]: v for k, v in bounds.items()}}
    schema = {"anyOf": [number, {"const": "auto"}, {"type": "null"}]}
    return Field(default=None, **bounds, json_schema_extra=schema)


class OpenAIHyperparameters(Strict):
    """OpenAI's three knobs."""

    n_epochs: Annotated[int | None, AUTO_IS_NONE] = auto_or("integer", ge=1, le=1000)
    batch_size: Annotated[int | None, AUTO_IS_NONE] = auto_or("integer", ge=1, le=256)
    learning_rate_multiplier: Annotated[float | None, AUTO_IS_NONE] = auto_or("number", gt=0, le=100)


class PromptTuning(Strict):
    """What a native job takes beyond OpenAI's fields."""

    num_virtual_tokens: int | None = Field(
        default=None, ge=1, description=f"Default: {per_method('num_virtual_tokens')}."
    )
    template: str | None = Field(
        default=None,
        description="As a native job's template. Default: the fine-tuned model's, else '{input}'.",
    )
    init: InitSpec | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(Strict):
    type: Literal["prompt_tuning", "prefix_tuning"] = Field(
        description="prompt_tuning: a soft prompt in front of the frozen model's input; prefix_tuning: keys "
        "and values in every layer of the frozen model ('supervised' would change its weights). A job "
        "without a method is prefix_tuning, the one that measured best."
    )
    prompt_tuning: PromptTuning | None = Field(default=None, description="With type prompt_tuning.")
    prefix_tuning: PromptTuning | None = Field(default=None, description="With type prefix_tuning.")

    @model_validator(mode="after")
    def _settings_match_the_type(self) -> Method:
        other = "prefix_tuning" if self.type == "prompt_tuning" else "prompt_tuning"
        if getattr(self, other) is not None:
            raise ValueError(f"{other} settings were given with type {self.type!r}")
        return self

    @property
    def tuning(self) -> PromptTuning:
        """The settings of the chosen type (its defaults when none were given)."""
        return getattr(self, self.type) or PromptTuning()


class FineTuningJobCreate(Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "smollm2-135m-instruct",
                    "training_file": "file-1",
                    "suffix": "sst2",
                    "method": {
                        "type": "prompt_tuning",
                        "prompt_tuning": {"template": "Review: {input}\nSentiment:"},
                    },
                }
            ]
        },
    )

    model: str = Field(description="The base backbone to tune on (GET /v1/models lists them).")
    training_file: str = Field(description="A file uploaded with purpose fine-tune.")
    validation_file: str | None = None
    suffix: str | None = Field(
        default=None,
        description="The task's name, so the model is ft:<backbone>:<suffix>:<version>; "
        "default: ft-<the training file's number>. A task that exists gets a new version.",
    )
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: OpenAIHyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = Field(default=None, max_length=0, description="Not supported: empty.")
    metadata: Metadata | None = None


class JobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    training_file: str | None
    validation_file: str | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    error: JobErrorObject | None
    user_provided_suffix: str
    metadata: dict[str, str] | None = None


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | None]


# -- models -----------------------------------------------------------------------------------------------


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


# -- completions ------------------------------------------------------------------------------------------


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What both completion routes take. `temperature` defaults to 1 as in OpenAI's API (sampling); send 0
    for greedy decoding."""

    model: str = Field(description="A backbone, ft:<backbone>:<task>:<version>, or a task name ('sst2').")
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16, description="Completions per prompt, run in the same batch.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="Accepted and not used.")
    # Sent by some clients with their neutral value; any other value is refused (neutral_only).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None


NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False}


class CompletionCreate(Sampling):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "sst2", "prompt": "a gorgeous, witty movie", "max_tokens": 4, "temperature": 0}
            ]
        },
    )

    prompt: str | list[str] = Field(description="Each prompt fills the task's template, as `input` does.")
    max_tokens: int = Field(default=16, ge=1)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = Field(default=None, max_length=0)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id and the like carry nothing we use
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionCreate(Sampling):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "sst2",
                    "messages": [{"role": "user", "content": "a gorgeous, witty movie"}],
                    "max_completion_tokens": 4,
                }
            ]
        },
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, description="Default: the server's limit.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as max_tokens.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
