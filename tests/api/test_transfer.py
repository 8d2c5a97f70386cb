"""Starting a job from a version in the registry (init strategy "version"): transfer from another task, or
more training of the same one, natively and as OpenAI continues a fine-tuned model."""

from __future__ import annotations

import io
import re
from functools import partial

import openai
import pytest
import torch
from typer.testing import CliRunner

from app.cli import cli
from app.contract.kinds import Method
from app.db.models import PromptVersion
from app.db.session import session_scope
from app.ml.soft_prompt import loose_shape, prompt_from_bytes
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, adapter_zip, bearer, new_key, sentiment_file, tune_here, upload


def prompt_of(settings, task: str, version: int) -> torch.Tensor:
    with session_scope(settings.registry_url) as session:
        row = session.query(PromptVersion).filter_by(version=version).join(PromptVersion.task)
        row = next(r for r in row if r.task.name == task)
        return prompt_from_bytes(row.vectors, shape=loose_shape(Method(row.method), row.embedding_dim))


def create(client, **body):
    return client.post("/v1/tuning/jobs", json={"task": "reviews", **body})


@pytest.mark.servers
def test_a_job_from_a_version_starts_as_it_and_its_version_names_its_parent(
    client, settings, trained, tiny_backbone
):
    # A start no fresh prompt could be: an imported adapter of zeros (3 virtual tokens).
    imported = client.post(
        "/v1/prompts/start/versions", files={"file": ("a.zip", adapter_zip())}, data={"template": TEMPLATE}
    )
    assert imported.status_code == 201, imported.text
    more = upload(client, sentiment_file()).json()["id"]
    # Nearly no learning: what the job publishes is where it started.
    body = {"training_dataset": more, "hyperparameters": {"steps": 2, "batch_size": 4, "learning_rate": 1e-9}}
    job = create(client, **body, init={"strategy": "version", "from": "start"})
    assert job.status_code == 201, job.text
    job = job.json()
    # The start is pinned at creation; the shape and the template are the source's.
    assert job["init"] == {"strategy": "version", "from": "start@1"}
    assert job["method"] == "prompt" and job["num_virtual_tokens"] == 3 and job["template"] == TEMPLATE
    assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "succeeded"

    version = client.get("/v1/prompts/reviews/versions/1").json()
    assert version["parent"] == "start@1" and imported.json()["parent"] is None
    listed = client.get("/v1/prompts/reviews/versions").json()["data"]
    assert [v["parent"] for v in listed] == ["start@1"]
    assert torch.allclose(prompt_of(settings, "reviews", 1), torch.zeros(3, 64), atol=1e-6)

    # Continuing the same task: its next version, and a template of the job's own is kept.
    again = create(
        client,
        **body,
        task="sst2",
        template="Text: {input}\nLabel:",
        init={"strategy": "version", "from": "sst2@1"},
    )
    assert again.status_code == 201 and again.json()["template"] == "Text: {input}\nLabel:"
    assert (
        run_job(db_url=settings.registry_url, job_id=again.json()["id"], backbone=tiny_backbone)
        == "succeeded"
    )
    assert client.get("/v1/prompts/sst2/versions/2").json()["parent"] == "sst2@1"


def test_a_start_version_that_is_not_the_callers_or_does_not_fit_is_refused_naming_the_field(
    client, settings, stack, trained
):
    dataset = trained["training_dataset"]
    source = client.get("/v1/prompts/sst2/versions/1").json()

    def refused(status: int, param: str, **body) -> str:
        answer = create(client, training_dataset=dataset, **body)
        assert answer.status_code == status, answer.text
        assert answer.json()["error"]["param"] == param, answer.json()
        return answer.json()["error"]["message"]

    assert "no version 9" in refused(404, "init.from", init={"strategy": "version", "from": "sst2@9"})
    refused(404, "init.from", init={"strategy": "version", "from": "nothing"})
    refused(422, "init.from", init={"strategy": "version", "from": "not a task"})
    refused(422, "init.from", init={"strategy": "version"})
    refused(422, "init.from", init={"strategy": "labels", "from": "sst2@1"})
    other = "prompt" if source["method"] == "prefix" else "prefix"
    assert "leave method out" in refused(
        422, "method", method=other, init={"strategy": "version", "from": "sst2@1"}
    )
    refused(
        422,
        "num_virtual_tokens",
        num_virtual_tokens=source["num_virtual_tokens"] + 1,
        init={"strategy": "version", "from": "sst2@1"},
    )

    # Another tenant's version is not there for this one, in the same words as one that never existed.
    globex = bearer(new_key(stack, "globex"))
    theirs = upload(client, sentiment_file(), headers=globex).json()["id"]
    answer = client.post(
        "/v1/tuning/jobs",
        json={"task": "mine", "training_dataset": theirs, "init": {"strategy": "version", "from": "sst2@1"}},
        headers=globex,
    )
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "init.from", answer.text


def test_a_job_whose_start_version_was_deleted_before_it_ran_fails_saying_so(
    client, settings, trained, tiny_backbone
):
    job = create(
        client, training_dataset=trained["training_dataset"], init={"strategy": "version", "from": "sst2@1"}
    ).json()
    assert client.delete("/v1/prompts/sst2/versions/1").status_code in (200, 204)
    assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "failed"
    failed = client.get(f"/v1/tuning/jobs/{job['id']}").json()
    assert failed["error"]["code"] == "start_version_missing" and "sst2@1" in failed["error"]["message"]


@pytest.mark.servers
def test_a_fine_tuned_model_goes_on_training_as_openai_continues_one(
    client, api_key, settings, tiny_backbone
):
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=api_key, http_client=client, max_retries=0)
    first = tune_here(client, settings, tiny_backbone, task="sst2", method="prompt")
    uploaded = sdk.files.create(file=("more.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")

    job = sdk.fine_tuning.jobs.create(
        model="ft:tiny:sst2:1", training_file=uploaded.id, hyperparameters={"batch_size": 4, "n_epochs": 1}
    )
    # OpenAI's shape: the job's model is the fine-tuned one; method and template are the version's.
    assert job.model == "ft:tiny:sst2:1" and job.method.type == "prompt_tuning"
    settings_shown = job.method.prompt_tuning  # our extension of OpenAI's method: the SDK keeps it a dict
    assert settings_shown["template"] == first["template"] and settings_shown["num_virtual_tokens"] == 4
    number = int(job.id.removeprefix("ftjob-"))
    assert run_job(db_url=settings.registry_url, job_id=number, backbone=tiny_backbone) == "succeeded"
    assert (
        sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == "ft:tiny:sst2:2"
    )  # the task's next version
    assert client.get("/v1/prompts/sst2/versions/2").json()["parent"] == "sst2@1"

    named = sdk.fine_tuning.jobs.create(model="ft:tiny:sst2:1", training_file=uploaded.id, suffix="reviews")
    assert named.user_provided_suffix == "reviews"

    for missing in ("ft:tiny:sst2:9", "ft:tiny:nothing:1", "ft:other:sst2:1"):
        with pytest.raises(openai.NotFoundError):
            sdk.fine_tuning.jobs.create(model=missing, training_file=uploaded.id)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.fine_tuning.jobs.create(
            model="ft:tiny:sst2:1",
            training_file=uploaded.id,
            extra_body={
                "method": {"type": "prompt_tuning", "prompt_tuning": {"init": {"strategy": "vocab"}}}
            },
        )
    assert refused.value.param == "method.prompt_tuning.init"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.fine_tuning.jobs.create(
            model="ft:tiny:sst2:1",
            training_file=uploaded.id,
            extra_body={"method": {"type": "prefix_tuning"}},
        )
    assert refused.value.param == "method.type"


def test_the_cli_starts_from_a_version_and_lists_each_versions_parent(
    server, api_key, client, settings, trained, tiny_backbone
):
    env = {"SOFTPROMPT_URL": server, "SOFTPROMPT_API_KEY": api_key, "COLUMNS": "120"}
    softprompt = partial(CliRunner().invoke, cli, env=env)
    queued = softprompt(
        ["tune", "--task", "sst2", "--dataset", str(trained["training_dataset"]), "--from", "sst2@1"]
    )
    assert queued.exit_code == 0, queued.output
    job_id = int(re.match(r"job (\d+) queued", queued.stdout)[1])
    assert client.get(f"/v1/tuning/jobs/{job_id}").json()["init"] == {"strategy": "version", "from": "sst2@1"}
    assert run_job(db_url=settings.registry_url, job_id=job_id, backbone=tiny_backbone) == "succeeded"
    listed = softprompt(["prompts", "versions", "sst2"])
    assert listed.exit_code == 0, listed.output
    assert [line.split("\t")[-1] for line in listed.stdout.splitlines()] == ["sst2@1", "-"]
