"""The real SmolLM2 backbone through `softprompt up`: the bare backbone's answers. Uploading, tuning and
classifying with it is the README's path, run as written in tests/e2e/test_readme.py."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import REAL_BACKBONE

pytestmark = [pytest.mark.e2e, pytest.mark.worker, REAL_BACKBONE]


def test_bare_backbone_answers_correctly(real_service):
    body = real_service.client.post(
        "/v1/generate", json={"task": None, "input": "The capital of France is", "max_new_tokens": 4}
    ).json()
    assert body["outputs"][0]["text"].startswith(" Paris"), body


def test_chat_with_the_bare_backbone_uses_its_chat_template(real_service):
    backbone = real_service.client.get("/v1/models").json()["data"][0]["id"]
    body = real_service.client.post(
        "/v1/chat/completions",
        json={
            "model": backbone,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    ).json()
    answer = body["choices"][0]["message"]
    assert answer["role"] == "assistant" and "Paris" in answer["content"], body
