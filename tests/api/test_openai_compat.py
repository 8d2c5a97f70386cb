"""The OpenAI-compatible routes, driven by the official `openai` package as a product backend would."""

from __future__ import annotations

import io
import time
from datetime import timedelta

import openai
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, bearer, quota_client, sentiment_file


def sdk_for(client, key: str) -> openai.OpenAI:
    """The SDK pointed at the service's /v1 with a tenant's key, over the test client's transport."""
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0)


@pytest.fixture
def sdk(client, api_key) -> openai.OpenAI:
    return sdk_for(client, api_key)


def tune(sdk: openai.OpenAI, settings, backbone, **extra) -> openai.types.fine_tuning.FineTuningJob:
    """Upload, create a job and run it in this process (the worker's part), then poll it like a client."""
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="sst2",
        seed=7,
        hyperparameters={"batch_size": 4},
        extra_body={
            "method": {
                "type": "prompt_tuning",
                "prompt_tuning": {
                    "template": TEMPLATE,
                    "num_virtual_tokens": 4,
                    "hyperparameters": {"steps": 3},
                },
            }
        },
        **extra,
    )
    assert job.status == "queued" and job.fine_tuned_model is None
    number = int(job.id.removeprefix("ftjob-"))
    assert run_job(db_url=settings.registry_url, job_id=number, backbone=backbone) == "succeeded"
    return sdk.fine_tuning.jobs.retrieve(job.id)


@pytest.mark.servers
def test_upload_tune_and_complete_with_the_tuned_model(sdk, client, settings, tiny_backbone):
    job = tune(sdk, settings, tiny_backbone)
    assert job.status == "succeeded"
    assert job.fine_tuned_model == "ft:tiny:sst2:1"
    assert job.seed == 7 and job.hyperparameters.batch_size == 4
    assert job.training_file.startswith("file-")

    completion = sdk.completions.create(
        model=job.fine_tuned_model, prompt="a gorgeous, witty movie", max_tokens=5, temperature=0
    )
    native = client.post(
        "/v1/generate",
        json={"task": "sst2@1", "input": "a gorgeous, witty movie", "max_new_tokens": 5},
    ).json()
    # The same engine and template as /v1/generate: greedy decoding gives the same text.
    assert completion.choices[0].text == native["outputs"][0]["text"]
    assert completion.choices[0].finish_reason == native["outputs"][0]["finish_reason"]
    assert completion.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    # The plain task name means its newest version.
    by_name = sdk.completions.create(
        model="sst2", prompt="a gorgeous, witty movie", max_tokens=5, temperature=0
    )
    assert by_name.choices[0].text == completion.choices[0].text

    models = [m.id for m in sdk.models.list()]
    assert models == ["tiny", "ft:tiny:sst2:1"]


def test_streamed_chat_completion_matches_the_unstreamed_one(sdk, settings, tiny_backbone):
    model = tune(sdk, settings, tiny_backbone).fine_tuned_model
    messages = [{"role": "user", "content": "dull and lifeless"}]
    whole = sdk.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.role == "assistant"

    stream = sdk.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_per_prompt_differ_when_sampling(sdk, settings, tiny_backbone):
    model = tune(sdk, settings, tiny_backbone).fine_tuned_model
    completion = sdk.completions.create(
        model=model, prompt=["one", "two"], n=3, max_tokens=8, temperature=1.5, seed=1
    )
    assert [c.index for c in completion.choices] == list(range(6))
    assert len({c.text for c in completion.choices[:3]}) > 1


def test_job_events_checkpoints_and_listing(sdk, settings, tiny_backbone):
    job = tune(sdk, settings, tiny_backbone)
    events = sdk.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(events.data) == 2 and events.has_more
    every = list(sdk.fine_tuning.jobs.list_events(job.id, limit=2))  # the SDK follows `after`
    assert len({e.id for e in every}) == len(every) > 2
    assert every[0].message == "Job queued."
    assert any(e.type == "metrics" for e in every)

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [job.fine_tuned_model]
    assert [j.id for j in sdk.fine_tuning.jobs.list()] == [job.id]
    assert [f.id for f in sdk.files.list()] == [job.training_file]


def test_cancel_and_delete(sdk, settings, tiny_backbone):
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)

    model = tune(sdk, settings, tiny_backbone).fine_tuned_model
    assert sdk.models.retrieve(model).owned_by == "acme"
    assert sdk.models.delete(model).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model=model, prompt="x", max_tokens=1)


def test_errors_surface_as_the_sdks_own_exceptions(sdk, client, settings, tiny_backbone):
    with pytest.raises(openai.AuthenticationError):
        sdk_for(client, "sk-wrong").models.list()

    with pytest.raises(openai.NotFoundError) as missing:
        sdk.completions.create(model="no-such-task", prompt="x", max_tokens=1)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"

    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-999999")
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("not-a-file-id")

    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        sdk.files.create(
            file=("bad.jsonl", io.BytesIO(b'{"text": "x", "label": "a"}\nnot json\n')), purpose="fine-tune"
        )
    assert invalid.value.code == "invalid_json" and "Line 2" in invalid.value.message

    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError) as supervised:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, method={"type": "supervised"})
    assert supervised.value.param == "method.type"
    with pytest.raises(openai.UnprocessableEntityError) as not_a_base:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=uploaded.id)
    assert not_a_base.value.param == "model"
    with pytest.raises(openai.NotFoundError) as no_file:
        sdk.fine_tuning.jobs.create(model="tiny", training_file="file-999999")
    assert no_file.value.param == "training_file"

    model = tune(sdk, settings, tiny_backbone).fine_tuned_model
    with pytest.raises(openai.UnprocessableEntityError) as penalty:
        sdk.completions.create(model=model, prompt="x", max_tokens=1, presence_penalty=1.0)
    assert penalty.value.param == "presence_penalty"
    with pytest.raises(openai.UnprocessableEntityError) as chat:
        sdk.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
        )
    assert chat.value.param == "messages"
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        sdk.completions.create(model=model, prompt="x", max_tokens=settings.max_new_tokens + 1)
    assert too_long.value.param == "max_tokens"


def test_request_rate_quota_is_the_sdks_rate_limit_error(settings, api_key):
    with quota_client(settings, api_key, tenant_inference_rps=2) as client:
        sdk = sdk_for(client, api_key)
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(6):
                sdk.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert limited.value.code == "rate_limited"
    assert limited.value.response.headers["Retry-After"] == "1"


def test_a_file_over_the_upload_limit_is_refused_before_it_is_read(settings, api_key):
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small), headers=bearer(api_key)) as client:
        sdk = sdk_for(client, api_key)
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.files.create(file=("big.jsonl", io.BytesIO(b"x" * 100_000)), purpose="fine-tune")
    assert refused.value.status_code == 413 and refused.value.code == "file_too_large"


def test_auto_hyperparameters_keep_the_defaults(sdk):
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    job = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters=auto)
    assert job.hyperparameters.batch_size == 32 and job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.type == "prefix_tuning"  # the default method


def test_the_learning_rate_multiplier_scales_the_methods_own_default(sdk, client):
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    for kind, rate in (("prompt_tuning", 0.06), ("prefix_tuning", 0.02)):
        job = sdk.fine_tuning.jobs.create(
            model="tiny",
            training_file=uploaded.id,
            hyperparameters={"learning_rate_multiplier": 2},
            extra_body={"method": {"type": kind}},
        )
        assert job.hyperparameters.learning_rate_multiplier == pytest.approx(2.0)
        native = client.get(f"/v1/tuning/jobs/{int(job.id.removeprefix('ftjob-'))}").json()
        assert native["hyperparameters"]["learning_rate"] == pytest.approx(rate)
    with pytest.raises(openai.UnprocessableEntityError) as zero:
        sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters={"n_epochs": 0})
    assert zero.value.param == "hyperparameters.n_epochs"


def test_a_running_jobs_estimated_finish_is_ahead(sdk, client, settings):
    from app.db.models import TuningJob
    from app.db.session import session_scope

    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    with session_scope(settings.registry_url) as session:  # as a worker 10 minutes into it reports
        row = session.get(TuningJob, int(job.id.removeprefix("ftjob-")))
        row.status, row.started_at = "running", row.created_at - timedelta(minutes=10)
        row.progress = {"step": 50, "total_steps": 100, "eta_seconds": 60.0}
    running = sdk.fine_tuning.jobs.retrieve(job.id)
    assert 55 <= running.estimated_finish - time.time() <= 61


def test_a_model_name_no_task_could_have_is_not_found(sdk):
    for model in ("gpt-3.5-turbo", "ft:tiny:Sst2:1", "gpt-4o"):
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1
            )
        assert missing.value.code == "model_not_found", model


def test_inference_errors_name_the_openai_fields(sdk, settings, tiny_backbone):
    with pytest.raises(openai.UnprocessableEntityError) as empty:
        sdk.completions.create(model="tiny", prompt=[], max_tokens=1)
    assert empty.value.param == "prompt"
    too_many = settings.max_batch_inputs // 2 + 1
    with pytest.raises(openai.UnprocessableEntityError) as many:
        sdk.completions.create(model="tiny", prompt=["x"] * too_many, n=2, max_tokens=1)
    assert many.value.param == "n" and f"make {2 * too_many} completions" in many.value.message
    model = tune(sdk, settings, tiny_backbone).fine_tuned_model
    with pytest.raises(openai.UnprocessableEntityError) as long:
        sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 400}], max_tokens=1
        )
    assert long.value.param == "messages"


def test_a_prefix_tuning_job_through_the_sdk_is_served_like_a_native_one(
    sdk, client, settings, tiny_backbone
):
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    settings_block = {"template": TEMPLATE, "num_virtual_tokens": 4, "hyperparameters": {"steps": 3}}
    job = sdk.fine_tuning.jobs.create(
        model="tiny",
        training_file=uploaded.id,
        suffix="deep",
        extra_body={"method": {"type": "prefix_tuning", "prefix_tuning": settings_block}},
    )
    number = int(job.id.removeprefix("ftjob-"))
    assert run_job(db_url=settings.registry_url, job_id=number, backbone=tiny_backbone) == "succeeded"
    job = sdk.fine_tuning.jobs.retrieve(job.id)
    assert job.method.type == "prefix_tuning" and job.fine_tuned_model == "ft:tiny:deep:1"
    assert client.get("/v1/prompts/deep/versions/1").json()["method"] == "prefix"
    completion = sdk.completions.create(
        model=job.fine_tuned_model, prompt="a witty movie", max_tokens=5, temperature=0
    )
    native = client.post(
        "/v1/generate", json={"task": "deep@1", "input": "a witty movie", "max_new_tokens": 5}
    ).json()
    assert completion.choices[0].text == native["outputs"][0]["text"]
    with pytest.raises(openai.UnprocessableEntityError) as mixed:
        sdk.fine_tuning.jobs.create(
            model="tiny",
            training_file=uploaded.id,
            extra_body={"method": {"type": "prompt_tuning", "prefix_tuning": settings_block}},
        )
    assert mixed.value.param == "method"
