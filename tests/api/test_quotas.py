"""Each tenant's quotas: past one, that tenant (and only that tenant) gets 429 with Retry-After."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import TEMPLATE, bearer, new_key, quota_client, sentiment_file, softprompt, upload

pytestmark = pytest.mark.servers  # quotas are counted in Redis, shared across replicas


def create_job(client, dataset_id: int, headers=None):
    body = {"task": "sst2", "training_dataset": dataset_id, "template": TEMPLATE}
    return client.post("/v1/tuning/jobs", json=body, headers=headers)


def test_jobs_past_the_concurrent_quota_get_429_until_one_ends(settings, stack, api_key):
    other = bearer(new_key(stack, "globex"))
    with quota_client(settings, api_key, tenant_max_active_jobs=1) as client:
        dataset = upload(client, sentiment_file()).json()["id"]
        first = create_job(client, dataset)
        assert first.status_code == 201
        refused = create_job(client, dataset)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "job_quota_exceeded"
        assert int(refused.headers["retry-after"]) > 0
        assert "limit is 1" in refused.json()["error"]["message"]

        their_dataset = upload(client, sentiment_file(), headers=other).json()["id"]
        assert create_job(client, their_dataset, headers=other).status_code == 201  # globex is not held back

        client.post(f"/v1/tuning/jobs/{first.json()['id']}/cancel")
        assert create_job(client, dataset).status_code == 201


def test_racing_requests_cannot_both_take_the_last_job_place(settings, api_key):
    with quota_client(settings, api_key, tenant_max_active_jobs=2) as client:
        dataset = upload(client, sentiment_file()).json()["id"]
        with ThreadPoolExecutor(6) as pool:
            statuses = sorted(pool.map(lambda _: create_job(client, dataset).status_code, range(6)))
        assert statuses == [201, 201, 429, 429, 429, 429]


def test_uploads_past_the_hourly_bytes_get_429_with_the_wait(settings, stack, api_key):
    size = len(sentiment_file())
    with quota_client(settings, api_key, tenant_upload_bytes_per_hour=2 * size - 1) as client:
        assert upload(client, sentiment_file()).status_code == 201
        refused = upload(client, sentiment_file())
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "upload_quota_exceeded"
        assert 3500 < int(refused.headers["retry-after"]) <= 3600  # when the first upload leaves the hour
        assert upload(client, sentiment_file(), headers=bearer(new_key(stack, "globex"))).status_code == 201

        too_big = upload(client, sentiment_file() * 2)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "upload_quota_exceeded"


def test_inference_past_the_rate_limit_gets_429_and_others_are_served(settings, stack, api_key):
    other = bearer(new_key(stack, "globex"))
    body = {"task": None, "input": "hello", "max_new_tokens": 1}
    with quota_client(settings, api_key, tenant_inference_rps=2) as client:
        answers = [client.post("/v1/generate", json=body) for _ in range(6)]
        refused = [a for a in answers if a.status_code == 429]
        assert refused and all(a.status_code in (200, 429) for a in answers)
        assert refused[0].json()["error"]["code"] == "rate_limited"
        assert refused[0].headers["retry-after"] == "1"
        assert client.post("/v1/generate", json=body, headers=other).status_code == 200
        time.sleep(1.1)
        assert client.post("/v1/generate", json=body).status_code == 200
        assert client.post("/v1/generate", json=body).status_code == 200
        classify = {"task": None, "input": "hello", "labels": ["a", "b"]}
        assert client.post("/v1/classify", json=classify).status_code == 429  # one budget for both routes


def test_a_tenants_own_quota_overrides_the_default(settings, stack, api_key):
    new_key(stack, "globex")
    shown = softprompt(stack, "tenants", "quota", "globex", "--max-active-jobs", "0")
    assert shown.returncode == 0, shown.stderr
    assert "max_active_jobs\t0\n" in shown.stdout and "inference_rps\t20 (server default)" in shown.stdout
    with quota_client(settings, api_key) as client:
        globex = bearer(new_key(stack, "globex"))
        dataset = upload(client, sentiment_file(), headers=globex).json()["id"]
        assert create_job(client, dataset, headers=globex).status_code == 429
        acme_dataset = upload(client, sentiment_file()).json()["id"]
        assert create_job(client, acme_dataset).status_code == 201

        reset = softprompt(stack, "tenants", "quota", "globex", "--max-active-jobs", "-1")
        assert "max_active_jobs\t4 (server default)" in reset.stdout
        assert create_job(client, dataset, headers=globex).status_code == 201
    unknown = softprompt(stack, "tenants", "quota", "nobody")
    assert unknown.returncode == 2 and "No tenant named 'nobody'" in unknown.stderr
