"""Listings stay bounded however many versions a tenant has: /v1/models and a task's versions come a page
at a time, a task shows its newest versions only, and the client follows the pages to the end."""

from __future__ import annotations

import pytest

from app import client as client_module
from app.client import Client
from tests.helpers import adapter_zip

VERSIONS = 25


def _import(client, task: str, count: int) -> None:
    for _ in range(count):
        response = client.post(
            f"/v1/prompts/{task}/versions",
            files={"file": ("a.zip", adapter_zip())},
            data={"template": "Review: {input}\nSentiment:"},
        )
        assert response.status_code == 201, response.text


def _pages(client, path: str, limit: int, cursor) -> list[list]:
    pages, params = [], {"limit": limit}
    while True:
        page = client.get(path, params=params).json()
        assert len(page["data"]) <= limit
        pages.append(page["data"])
        if not page["has_more"]:
            return pages
        params["after"] = cursor(page["data"][-1])


@pytest.mark.servers
def test_a_task_shows_its_newest_versions_and_pages_through_all_of_them(client):
    _import(client, "many", VERSIONS)
    task = client.get("/v1/prompts/many").json()
    assert task["version_count"] == VERSIONS and task["latest_version"] == VERSIONS
    assert [v["version"] for v in task["versions"]] == list(range(VERSIONS - 19, VERSIONS + 1))
    assert client.get("/v1/prompts").json()["data"][0]["versions"] == task["versions"]

    pages = _pages(client, "/v1/prompts/many/versions", 10, lambda v: v["version"])
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [v["version"] for p in pages for v in p] == list(range(VERSIONS, 0, -1))
    assert client.get("/v1/prompts/none/versions").status_code == 404


@pytest.mark.servers
def test_models_come_a_page_at_a_time_backbones_first_then_newest_versions(client, settings):
    _import(client, "many", 12)
    _import(client, "other", 3)
    pages = _pages(client, "/v1/models", 4, lambda m: m["id"])
    ids = [m["id"] for p in pages for m in p]
    assert [len(p) for p in pages] == [4, 4, 4, 4]  # 1 backbone and 15 versions
    assert ids[0] == "tiny"
    expected = [f"ft:tiny:other:{v}" for v in (3, 2, 1)] + [f"ft:tiny:many:{v}" for v in range(12, 0, -1)]
    assert ids[1:] == expected
    unknown = client.get("/v1/models", params={"after": "ft:tiny:many:99"})
    assert unknown.status_code == 404


def test_the_client_follows_every_page(client, server, api_key, monkeypatch):
    monkeypatch.setattr(client_module, "PAGE", 3)
    _import(client, "many", 7)
    for name in ("a", "b", "c"):
        _import(client, name, 1)
    with Client(server, key=api_key) as sdk:
        assert [v.version for v in sdk.list_versions("many")] == list(range(7, 0, -1))
        assert [t.name for t in sdk.list_tasks()] == ["c", "b", "a", "many"]
        assert [t.name for t in sdk.list_tasks(limit=2)] == ["c", "b"]
