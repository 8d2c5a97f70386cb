"""The dashboard in a real headless browser (Debian's Chromium, driven by Playwright), over real HTTP."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from app.services.evaluation.evaluating import run_evaluation
from app.services.runs import lifecycle as runs
from app.services.tuning.training import run_job
from tests.helpers import TEMPLATE, new_key, sentiment_file, upload

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As root, with no network beyond this machine: no sandbox, and no background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 24
# Where to keep the screenshot of the finished job (docs/images/dashboard.png for the docs).
SCREENSHOT = os.environ.get("SOFTPROMPT_DASHBOARD_SCREENSHOT")


@pytest.fixture
def finished_job(client, settings, tiny_backbone, monkeypatch):
    """A succeeded job that reported its loss at every step (the worker reports at most once a second)."""
    monkeypatch.setattr(runs, "PROGRESS_INTERVAL_S", 0.0)
    dataset = upload(client, sentiment_file()).json()["id"]
    body = {
        "task": "sst2",
        "training_dataset": dataset,
        "template": TEMPLATE,
        "num_virtual_tokens": 4,
        "hyperparameters": {"steps": STEPS, "batch_size": 4, "learning_rate": 0.3},
    }
    job = client.post("/v1/tuning/jobs", json=body).json()
    assert run_job(db_url=settings.registry_url, job_id=job["id"], backbone=tiny_backbone) == "succeeded"
    return job


@pytest.fixture
def finished_evaluation(client, settings, tiny_backbone, finished_job):
    """The job's version and the bare backbone scored on the 20 reviews, as the API answers for it."""
    dataset = upload(client, sentiment_file(), filename="test.jsonl").json()["id"]
    created = client.post("/v1/evaluations", json={"dataset": dataset, "models": ["sst2@1", None]}).json()
    outcome = run_evaluation(
        db_url=settings.registry_url, evaluation_id=created["id"], backbone=tiny_backbone
    )
    assert outcome == "succeeded"
    return client.get(f"/v1/evaluations/{created['id']}").json()


@pytest.fixture
def page():
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: `make test` installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []

        def console(message) -> None:
            # Before a key is typed, the first poll is refused; the browser logs that 401 as an error.
            if message.type == "error" and "status of 401" not in message.text:
                errors.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        yield page
        browser.close()


def test_dashboard_shows_tasks_jobs_and_the_loss_curve_and_tries_a_task(
    server, page, finished_job, finished_evaluation, api_key
):
    """Everything on one page (the evaluation too, for the screenshot); evaluations are checked below."""
    page.goto(f"{server}/dashboard")
    page.fill("#key", api_key)
    page.click("#save-key")

    expect(page.locator("#tasks tbody tr")).to_have_count(1)
    expect(page.locator("#tasks tbody tr td").first).to_have_text("sst2")
    expect(page.locator("#tasks tbody tr td").nth(2)).to_have_text("–")  # started from no other version
    expect(page.locator("#tasks tbody tr td").nth(3)).to_have_text(
        "prefix"
    )  # the version's method: the default
    job_row = page.locator(f'#jobs tr[data-job-id="{finished_job["id"]}"]')
    expect(job_row).to_contain_text("succeeded")
    expect(job_row).to_contain_text(f"{STEPS} / {STEPS}")
    expect(job_row).to_contain_text("sst2@1")

    # The newest job is shown: one point per reported step.
    expect(page.locator("#curve-title")).to_contain_text(f"Job {finished_job['id']} (sst2), succeeded")
    points = page.locator("#curve polyline").get_attribute("points").split()
    assert len(points) == STEPS
    heights = [float(p.split(",")[1]) for p in points]
    assert max(heights) > min(heights)  # a curve, not a flat line

    page.select_option("#try-task", "sst2")
    page.fill("#try-input", "a wonderful, moving film")  # a training example: the tiny model knows it
    page.click("#try-generate")
    expect(page.locator("#try-output")).not_to_have_text("…")
    page.click("#try-classify")
    expect(page.locator("#try-output")).to_have_text(re.compile(r"^positive  \{.*\}$"))

    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    assert page.errors == []  # no script errors, no refused resources (the page's CSP)


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def test_dashboard_compares_an_evaluations_models(server, page, finished_evaluation, api_key):
    evaluation = finished_evaluation
    trained, bare = (result["metrics"] for result in evaluation["results"])
    page.goto(f"{server}/dashboard")
    page.fill("#key", api_key)
    page.click("#save-key")

    row = page.locator(f'#evaluations tr[data-evaluation-id="{evaluation["id"]}"]')
    expect(row).to_have_count(1)
    cells = [row.locator("td").nth(i).text_content() for i in range(6)]
    assert cells == [
        str(evaluation["id"]),
        "succeeded",
        str(evaluation["dataset"]),
        "40 / 40",
        "sst2@1\nbare backbone",
        f"accuracy {percent(trained['accuracy'])}\naccuracy {percent(bare['accuracy'])}",
    ]

    # The newest succeeded evaluation is shown: a chart per metric, a bar per model, on a 0-100 scale.
    expect(page.locator("#comparison-title")).to_have_text(
        f"Evaluation {evaluation['id']} on dataset {evaluation['dataset']}: sst2@1 vs bare backbone"
    )
    charts = page.locator("#comparison-charts svg")
    expect(charts).to_have_count(2)
    assert [charts.nth(i).get_attribute("data-metric") for i in range(2)] == ["accuracy", "macro_f1"]
    for name in ("accuracy", "macro_f1"):
        chart = page.locator(f'#comparison-charts svg[data-metric="{name}"]')
        assert chart.locator("text.model").all_text_contents() == ["sst2@1", "bare backbone"]
        values = [trained[name], bare[name]]
        assert chart.locator("text.value").all_text_contents() == [percent(v) for v in values]
        full = float(chart.locator("line.full").get_attribute("y1"))
        for bar, value in zip(chart.locator("rect.bar").all(), values, strict=True):
            top, height = float(bar.get_attribute("y")), float(bar.get_attribute("height"))
            assert height == pytest.approx(value * (top + height - full), abs=0.05)

    assert page.errors == []


def test_another_key_shows_only_its_tenants_objects(
    server, page, finished_job, finished_evaluation, api_key, stack
):
    page.goto(f"{server}/dashboard")
    page.fill("#key", api_key)
    page.click("#save-key")
    expect(page.locator("#curve polyline")).to_have_count(1)
    expect(page.locator("#comparison-charts svg")).to_have_count(2)

    page.fill("#key", "sp-wrong")
    page.click("#save-key")
    expect(page.locator("#status")).to_contain_text("The API key is not valid")
    expect(page.locator("#tasks tbody tr")).to_have_count(0)
    expect(page.locator("#curve polyline")).to_have_count(0)
    expect(page.locator("#evaluations tbody tr")).to_have_count(0)
    expect(page.locator("#comparison-charts svg")).to_have_count(0)

    # Another tenant's key: nothing of acme's, and no error about acme's job that was on show.
    page.fill("#key", new_key(stack, "globex"))
    page.click("#save-key")
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#jobs tbody tr")).to_have_count(0)
    with page.expect_response(lambda answer: "/v1/evaluations?" in answer.url, timeout=10_000):
        pass  # one more poll, the last of its reads
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#curve polyline")).to_have_count(0)
    expect(page.locator("#evaluations tbody tr")).to_have_count(0)
