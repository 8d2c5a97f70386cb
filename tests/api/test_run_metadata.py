"""Metadata on jobs and evaluations: a client's own key-value pairs, stored, returned, and filtered on in the
lists with ?metadata[key]=value, as OpenAI's fine-tuning jobs carry them."""

from __future__ import annotations

import io

import openai
import pytest

from tests.helpers import TEMPLATE, sentiment_file, upload

ODD = {'we"ird\\key': "ünïcode value", "team": "search"}  # keys a JSON path could not name on SQLite


def job(client, dataset: int, metadata: dict | None):
    body = {"task": "reviews", "training_dataset": dataset, "template": TEMPLATE}
    return client.post(
        "/v1/tuning/jobs", json=body | ({"metadata": metadata} if metadata is not None else {})
    )


def listed(client, path: str, **pairs: str) -> list[int]:
    params = {f"metadata[{key}]": value for key, value in pairs.items()}
    answer = client.get(path, params=params)
    assert answer.status_code == 200, answer.text
    return [item["id"] for item in answer.json()["data"]]


@pytest.mark.servers
def test_jobs_and_evaluations_keep_their_metadata_and_the_lists_filter_on_it(client):
    dataset = upload(client, sentiment_file()).json()["id"]
    made = [
        job(client, dataset, {"team": "search", "stage": "dev"}),
        job(client, dataset, ODD),
        job(client, dataset, {"team": "ads"}),
        job(client, dataset, None),
    ]
    assert all(answer.status_code == 201 for answer in made), [a.text for a in made]
    ids = [answer.json()["id"] for answer in made]
    assert [answer.json()["metadata"] for answer in made] == [
        {"team": "search", "stage": "dev"},
        ODD,
        {"team": "ads"},
        None,
    ]
    assert client.get(f"/v1/tuning/jobs/{ids[1]}").json()["metadata"] == ODD

    path = "/v1/tuning/jobs"
    assert listed(client, path, team="search") == [ids[1], ids[0]]  # newest first
    assert listed(client, path, team="search", stage="dev") == [ids[0]]
    assert listed(client, path, **{'we"ird\\key': "ünïcode value"}) == [ids[1]]
    assert listed(client, path, team="nobody") == []
    assert listed(client, path) == ids[::-1]

    evaluation = client.post(
        "/v1/evaluations",
        json={"dataset": dataset, "models": [None], "template": TEMPLATE, "metadata": {"team": "search"}},
    )
    assert evaluation.status_code == 201 and evaluation.json()["metadata"] == {"team": "search"}
    other = client.post("/v1/evaluations", json={"dataset": dataset, "models": [None], "template": TEMPLATE})
    assert other.json()["metadata"] is None
    assert listed(client, "/v1/evaluations", team="search") == [evaluation.json()["id"]]


def test_metadata_past_openais_limits_is_refused_naming_the_field(client):
    dataset = upload(client, sentiment_file()).json()["id"]
    for metadata, field in (
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"": "v"}, "metadata"),
        ({"team": "v" * 513}, "metadata.team"),
        ({"team": "a\x00b"}, "metadata.team"),
        ({"team": 3}, "metadata.team"),
    ):
        answer = job(client, dataset, metadata)
        assert answer.status_code == 422, (metadata, answer.text)
        assert answer.json()["error"]["param"].startswith(field), (metadata, answer.json())
    assert job(client, dataset, {f"k{i}": "v" * 512 for i in range(16)}).status_code == 201  # at the limits

    for params, param in (
        ({"metadata[team]": ["a", "b"]}, "metadata[team]"),
        ({f"metadata[k{i}]": "v" for i in range(17)}, "metadata"),
        ({"metadata[]": "v"}, "metadata"),
        ({"metadata[team]": "v" * 513}, "metadata[team]"),
    ):
        answer = client.get("/v1/tuning/jobs", params=params)
        assert answer.status_code == 422 and answer.json()["error"]["param"] == param, answer.text


@pytest.mark.servers
def test_the_openai_sdk_tags_jobs_and_lists_them_by_their_metadata(client, api_key):
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=api_key, http_client=client, max_retries=0)
    uploaded = sdk.files.create(file=("reviews.jsonl", io.BytesIO(sentiment_file())), purpose="fine-tune")
    tagged = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, metadata={"team": "search"})
    untagged = sdk.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    assert tagged.metadata == {"team": "search"} and untagged.metadata is None
    assert sdk.fine_tuning.jobs.retrieve(tagged.id).metadata == {"team": "search"}
    found = sdk.fine_tuning.jobs.list(metadata={"team": "search"})
    assert [j.id for j in found.data] == [tagged.id]
    assert {j.id for j in sdk.fine_tuning.jobs.list().data} == {tagged.id, untagged.id}
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.fine_tuning.jobs.create(
            model="tiny", training_file=uploaded.id, metadata={f"k{i}": "v" for i in range(17)}
        )
    assert refused.value.param.startswith("metadata")
