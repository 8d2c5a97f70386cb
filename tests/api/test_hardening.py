"""What a tenant with a key could do to the service, and what it gets instead: every request's work bounded
with a 422 naming the field and the limit, odd text refused at the edge on every database, nothing
half-stored, and the event loop free while uploads are parsed. Each test here failed before its fix."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.helpers import adapter_zip, bearer, jsonl, quota_client, running, sentiment_file, upload


def post_raw(client, path: str, text: str):
    """A JSON body sent as written: lone surrogates escaped as JSON allows, and numbers json.dumps can't
    write (1e400, NaN)."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def refusal(response, param: str) -> dict:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def import_adapter(client, task: str, headers=None, **form):
    form.setdefault("template", "{input}")
    return client.post(
        f"/v1/prompts/{task}/versions", files={"file": ("a.zip", adapter_zip())}, data=form, headers=headers
    )


# -- 1. stop strings ---------------------------------------------------------------------------------------


def test_stop_strings_past_their_number_or_length_are_refused_at_once(client, settings):
    long = "x" * (settings.max_stop_chars + 1)
    attack = ["x" * 100_000] * 4  # the 400 KB body that held the engine for 16 s
    for stop in ([long], attack, ["a", "b", "c", "d", "e"]):
        native = client.post("/v1/generate", json={"input": ["a"] * 4, "max_new_tokens": 10, "stop": stop})
        error = refusal(native, "stop")
        limit = (
            settings.max_stop_chars if len(stop) <= settings.max_stop_strings else settings.max_stop_strings
        )
        assert str(limit) in error["message"]
        openai = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "stop": stop})
        refusal(openai, "stop")
    within = ["y" * settings.max_stop_chars] * settings.max_stop_strings
    answered = client.post("/v1/generate", json={"input": "a", "max_new_tokens": 3, "stop": within})
    assert answered.status_code == 200, answered.text


@pytest.mark.parametrize("route", ["generate", "classify"])
def test_a_client_that_goes_away_stops_its_work(settings, api_key, tiny_backbone, monkeypatch, route):
    """Without a watch on the connection, the rows ran to their end for nobody."""
    from app.ml import decode_batch, engine, inference, layout

    def slowly(function):
        def slow(*args, **kwargs):
            time.sleep(0.05)
            return function(*args, **kwargs)

        return slow

    monkeypatch.setattr(engine, "decode_step", slowly(decode_batch.decode_step))
    monkeypatch.setattr(engine, "start_prefill", slowly(decode_batch.start_prefill))
    monkeypatch.setattr(inference, "target_log_probs", slowly(layout.target_log_probs))
    settings.engine_chunk_tokens = 8  # classification: many small chunks, each one slowed
    app = create_app(settings)
    if route == "generate":
        body = {"input": ["once upon a time"] * 4, "max_new_tokens": 64}  # 64 steps: >= 3.2 s
    else:
        body = {"input": ["a long review of a film"] * 8, "labels": [f"label {i} of many" for i in range(40)]}
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/{route}", json=body, headers=bearer(api_key), timeout=0.5)
        engine_ = app.state.serving.engine
        deadline = time.monotonic() + 1.5
        while engine_.outstanding_rows and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine_.outstanding_rows == 0, "the engine kept working for a client that left"


# -- 2. classification work ------------------------------------------------------------------------------


def test_labels_past_their_number_or_length_are_refused(client, settings, trained):
    too_many = [f"label {i}" for i in range(settings.max_labels + 1)]
    error = refusal(
        client.post("/v1/classify", json={"task": "sst2", "input": "x", "labels": too_many}), "labels"
    )
    assert str(settings.max_labels) in error["message"]
    long = "very " * settings.max_label_tokens
    error = refusal(client.post("/v1/classify", json={"input": "x", "labels": ["short", long]}), "labels.1")
    assert str(settings.max_label_tokens) in error["message"]
    # The attack: 16 inputs x 100 labels of ~150 tokens.
    attack = {"input": ["some input"] * 16, "labels": [f"{i} " + "word " * 150 for i in range(100)]}
    assert client.post("/v1/classify", json=attack).status_code == 422
    settings.max_classify_tokens = 50
    labels = ["one two three", "four five six"]
    error = refusal(client.post("/v1/classify", json={"input": ["a"] * 20, "labels": labels}), "input")
    assert "50" in error["message"]


def test_a_task_or_dataset_with_too_many_labels_is_refused_and_nothing_is_stored(client, settings):
    settings.max_labels = 3
    four = ["a", "b", "c", "d"]
    error = refusal(import_adapter(client, "many", labels=json.dumps(four)), "labels")
    assert "3" in error["message"]
    assert client.get("/v1/prompts/many").status_code == 404
    rows = [{"text": f"example {i}", "label": label} for i, label in enumerate(four * 2)]
    refused = upload(client, jsonl(rows))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_many_labels"
    assert client.get("/v1/datasets").json()["data"] == []


# -- 3. the event loop -----------------------------------------------------------------------------------


@pytest.mark.servers
def test_healthz_answers_within_100_ms_while_a_50_mb_upload_is_parsed(settings, api_key, tmp_path):
    # Sentences of random words, so that the records the registry stores are no smaller, compressed, than a
    # real 50 MB file's (one sentence repeated would shrink 200-fold).
    rng = random.Random(0)
    words = [
        f"{rng.choice('bcdfglmnprst')}{rng.choice('aeiou')}{rng.choice('nrstl')}{n}" for n in range(5000)
    ]
    lines, size = [], 0
    while size < 50_000_000:
        record = {"text": " ".join(rng.choices(words, k=40)), "label": rng.choice(["positive", "negative"])}
        lines.append(json.dumps(record))
        size += len(lines[-1]) + 1
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    settings.max_upload_bytes = big.stat().st_size + 1024
    # The upload comes from another process, as it would in use: a client thread in this one would share
    # the interpreter lock with the server and measure itself.
    client_code = (
        "import httpx, sys; url, key, path = sys.argv[1:]; "
        "r = httpx.post(url + '/v1/datasets', files={'file': ('big.jsonl', open(path, 'rb'))}, "
        "headers={'Authorization': 'Bearer ' + key}, timeout=300); print(r.status_code, r.text[:200])"
    )
    with running(create_app(settings)) as url, httpx.Client(base_url=url) as probe:
        assert probe.get("/healthz").status_code == 200  # connected before the upload starts
        sender = subprocess.Popen(
            [sys.executable, "-c", client_code, url, api_key, str(big)], stdout=subprocess.PIPE, text=True
        )
        latencies = []
        while sender.poll() is None:
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    answer = sender.stdout.read()
    assert answer.startswith("201"), answer
    assert len(latencies) >= 20, "the upload ended before it could be measured"
    print(
        f"/healthz during a 50 MB upload: {len(latencies)} probes, the slowest {max(latencies) * 1000:.0f} ms"
    )
    assert max(latencies) < 0.1, f"/healthz took {max(latencies) * 1000:.0f} ms during the upload"


# -- 4. text the database cannot hold ----------------------------------------------------------------------


def test_what_the_api_loads_at_start_is_out_of_the_garbage_collectors_way(settings, api_key):
    """A full collection walking the modules and the model stopped the event loop for 0.3-0.7 s at random
    (the occasional slow /healthz of the test above); once started, the API's collections skip them."""
    with TestClient(create_app(settings), headers=bearer(api_key)) as client:
        assert client.get("/healthz").status_code == 200
        started = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - started
    assert took < 0.05, f"a full garbage collection took {took * 1000:.0f} ms"


def test_names_nul_and_non_finite_numbers_are_422_naming_the_field(client):
    long_name = "a" * 252 + ".jsonl"  # 258 characters: more than a file name column holds
    assert "file" in refusal(upload(client, sentiment_file(), filename=long_name), "file")["message"]
    fits = "b" * 224 + ".jsonl"  # 230: the dataset's name falls back to it and holds it whole
    stored = upload(client, sentiment_file(), filename=fits)
    assert stored.status_code == 201, stored.text
    assert stored.json()["name"] == fits
    refusal(upload(client, sentiment_file(), name="nul\x00name"), "name")
    dataset = stored.json()["id"]
    job = {"task": "t", "training_dataset": dataset, "template": "Review: {input}\x00"}
    refusal(client.post("/v1/tuning/jobs", json=job), "template")
    for number in ("1e400", "-1e400", "NaN", "Infinity"):
        hyperparameters = f'{{"max_grad_norm": {number}}}'
        text = f'{{"task": "t", "training_dataset": {dataset}, "hyperparameters": {hyperparameters}}}'
        refusal(post_raw(client, "/v1/tuning/jobs", text), "hyperparameters.max_grad_norm")
    assert client.get("/v1/tuning/jobs").json()["data"] == []
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [dataset]


# -- 5. lone surrogates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text", "param"),
    [
        ("/v1/generate", '{"input": "a\\ud800b"}', "input"),
        ("/v1/generate", '{"input": ["fine", "\\udfff"]}', "input.1"),
        ("/v1/classify", '{"input": "\\ud800", "labels": ["a", "b"]}', "input"),
        ("/v1/classify", '{"input": "fine", "labels": ["a", "\\ud800"]}', "labels.1"),
        ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        ("/v1/generate", '{"input": "a", "stop": ["\\u0000"]}', "stop.0"),
    ],
)
def test_lone_surrogates_and_nul_in_json_are_422_naming_the_field(client, path, text, param):
    refusal(post_raw(client, path, text), param)


def test_a_dataset_row_with_a_lone_surrogate_is_refused_at_its_line(client):
    content = b'{"text": "fine", "label": "a"}\n{"text": "bad \\ud800", "label": "b"}\n'
    refused = upload(client, content)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["line"] == 2 and refused.json()["error"]["param"] == "text"
    assert client.get("/v1/datasets").json()["data"] == []


def test_an_import_with_a_lone_surrogate_label_stores_nothing_and_the_registry_keeps_answering(client):
    refused = import_adapter(client, "odd", labels='["fine", "\\ud800"]')
    refusal(refused, "labels.1")
    assert client.get("/v1/prompts/odd").status_code == 404
    assert client.get("/v1/prompts").status_code == 200
    assert import_adapter(client, "odd", labels='["fine", "bad"]').status_code == 201


# -- 6. imports are uploads ------------------------------------------------------------------------------


def test_imports_count_toward_the_upload_quota_and_carry_the_caps(settings, api_key):
    size = len(adapter_zip())
    with quota_client(settings, api_key, tenant_upload_bytes_per_hour=2 * size + 10) as client:
        assert import_adapter(client, "q").status_code == 201
        assert import_adapter(client, "q").status_code == 201
        refused = import_adapter(client, "q")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "upload_quota_exceeded"
        assert upload(client, sentiment_file()).status_code == 429  # and datasets share the same bytes
        settings.tenant_upload_bytes_per_hour = 10**9
    with quota_client(settings, api_key) as client:
        template = "{input}" + "x" * settings.max_template_chars
        error = refusal(import_adapter(client, "t", template=template), "template")
        assert str(settings.max_template_chars) in error["message"]
        assert client.get("/v1/prompts/t").status_code == 404


# -- 7. /metrics and DNS rebinding -------------------------------------------------------------------------


def test_metrics_refuse_a_foreign_host_or_origin_even_from_loopback(settings):
    local = TestClient(create_app(settings), base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    assert local.get("/metrics").status_code == 200
    assert local.get("/metrics", headers={"Host": "evil.example"}).status_code == 401
    assert local.get("/metrics", headers={"Origin": "http://evil.example"}).status_code == 401
    assert local.get("/metrics", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 401


def test_behind_a_proxy_that_names_no_client_loopback_can_be_untrusted(settings, stack):
    """A proxy on this machine that adds no forwarding header makes every client look local: with
    trust_loopback off, neither open mode nor /metrics answers a local request without its key or token."""
    app = create_app(settings.model_copy(update={"trust_loopback": False, "auth_cache_ttl_s": 0.0}))
    local = TestClient(app, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    assert local.get("/v1/datasets").status_code == 401  # no key exists yet: open mode would answer
    assert local.get("/metrics").status_code == 401


def test_templates_are_bounded_everywhere(client, settings):
    dataset = upload(client, sentiment_file()).json()["id"]
    template = "{input}" + "x" * settings.max_template_chars
    job = client.post(
        "/v1/tuning/jobs", json={"task": "t", "training_dataset": dataset, "template": template}
    )
    assert str(settings.max_template_chars) in refusal(job, "template")["message"]
