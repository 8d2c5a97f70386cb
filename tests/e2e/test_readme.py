"""The README's five minutes, run as a newcomer runs them: `softprompt up` (what `make up` starts once it
has installed) on a fresh data directory with the real backbone (tests/e2e/conftest.py), then the
README's curl lines and its CLI lines exactly as written, read from the README itself. The only change is
the address, because the test cannot count on port 8000 being free. A version must be published and must
classify the README's two sentences as they read, every time: this is the first thing a user sees work,
or fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REAL_BACKBONE
from tests.paths import REPO, SST2_DEV

pytestmark = [pytest.mark.e2e, pytest.mark.worker, REAL_BACKBONE]
README_URL = "http://127.0.0.1:8000"
SENTENCES = {"a gorgeous, witty, seductive movie.": "positive", "dull and lifeless": "negative"}


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block after the line ``heading``: comment lines dropped, and a command
    that goes on over several lines (a trailing backslash, a quote still open) kept whole."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if current.count("'") % 2 == 0 and not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    assert not current, f"an unfinished command in the README: {current!r}"
    return commands


def run(command: str, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_readme_curl_lines_publish_sst2_and_classify_its_two_sentences(real_service):
    client, url = real_service.client, real_service.url
    commands = readme_commands("**With curl:**")
    assert len(commands) == 7 and commands[0].startswith("head -400"), commands
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
    outputs = [run(c.replace(README_URL, url), env, timeout=900) for c in commands]

    dataset, job = json.loads(outputs[1]), json.loads(outputs[2])
    assert dataset["id"] == 1 and dataset["num_examples"] == 400, dataset
    assert dataset["labels"] == ["negative", "positive"]
    assert job["id"] == 1 and job["task"] == "sst2", job
    # The event stream, the README's "live" line, ends when the job does.
    assert '"status": "succeeded"' in outputs[4], outputs[4][-2000:]
    done = client.get("/v1/tuning/jobs/1").json()
    assert done["status"] == "succeeded", done
    assert done["result"] == {"task": "sst2", "version": 1}
    verdict = done["metrics"]["zero_shot_test"]
    assert not verdict["worse"] and verdict["rows"] == 40
    metrics = done["metrics"]
    tuned, bare = metrics["val_accuracy"], metrics["zero_shot_accuracy"]
    print(f"README job: hold-out accuracy {tuned} against {bare} bare; {verdict}")  # shown with -s

    classified = json.loads(outputs[5])
    assert classified["task"] == "sst2" and classified["version"] == 1, classified
    assert [r["label"] for r in classified["results"]] == list(SENTENCES.values()), classified
    generated = json.loads(outputs[6])
    assert generated["outputs"][0]["text"].startswith(" Paris"), generated

    # Beyond the README's two sentences: a broken prompt or template lands near 0.5 on SST-2 dev (the bare
    # template scores about 0.79 there).
    with SST2_DEV.open() as f:
        dev = [json.loads(line) for _, line in zip(range(64), f, strict=False)]
    results = client.post("/v1/classify", json={"task": "sst2@1", "input": [r["text"] for r in dev]}).json()
    right = sum(r["label"] == row["label"] for r, row in zip(results["results"], dev, strict=True))
    assert right / len(dev) >= 0.7, right


def test_the_readme_cli_lines_tune_and_classify_the_same_way(real_service):
    client, url = real_service.client, real_service.url
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPROMPT_")}
    if not client.get("/v1/datasets").json()["data"]:  # run alone: the README's curl upload comes first
        for command in readme_commands("**With curl:**")[:2]:
            run(command.replace(README_URL, url), env, timeout=60)
    commands = readme_commands("**With the CLI**")
    assert [c.split()[:2] for c in commands] == [
        ["softprompt", "datasets"],
        ["softprompt", "tune"],
        ["softprompt", "classify"],
    ]
    venv_bin = str(Path(sys.executable).parent)  # "softprompt with the venv active"
    env.update(SOFTPROMPT_URL=url, PATH=f"{venv_bin}:{env['PATH']}")
    uploaded, tuned, classified = (run(c, env, timeout=900) for c in commands)
    assert "400" in uploaded, uploaded
    assert "succeeded" in tuned and "sst2@2" in tuned, tuned[-2000:]
    labels = [line.split("\t")[0] for line in classified.splitlines()]
    assert labels == list(SENTENCES.values()), classified
