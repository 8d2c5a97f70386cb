"""SST-2 through a running service: upload training rows, tune a prompt, classify dev rows.

    .venv/bin/python bench/sst2_service.py --url http://127.0.0.1:8000

Prints the tuned accuracy next to zero-shot accuracy with the same template (the bare backbone, template
applied here), and the job's wall time."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.contract.kinds import ACTIVE_STATUSES, JobStatus  # noqa: E402

SST2 = ROOT.parent / "shared/data/sst2"
TEMPLATE = "Review: {input}\nSentiment:"


def read_rows(path: Path, count: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(count), f, strict=False)]


def accuracy(
    client: httpx.Client,
    rows: list[dict],
    *,
    task: str | None,
    labels: list[str],
    template: str | None = None,
    batch: int = 32,
) -> float:
    correct = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        inputs = [template.replace("{input}", r["text"]) if template else r["text"] for r in chunk]
        body = {"task": task, "input": inputs, "labels": labels}
        response = client.post("/v1/classify", json=body)
        response.raise_for_status()
        correct += sum(
            res["label"] == r["label"] for res, r in zip(response.json()["results"], chunk, strict=True)
        )
    return correct / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    client = httpx.Client(base_url=args.url, timeout=600)
    train = read_rows(SST2 / "train.jsonl", args.train_rows)
    dev = read_rows(SST2 / "dev.jsonl", args.dev_rows)
    payload = "\n".join(json.dumps(r) for r in train).encode()
    dataset = client.post("/v1/datasets", files={"file": ("sst2-train.jsonl", io.BytesIO(payload))})
    dataset.raise_for_status()
    dataset = dataset.json()
    print(f"dataset {dataset['id']}: {dataset['num_examples']} rows, labels {dataset['labels']}")

    job = client.post(
        "/v1/tuning/jobs",
        json={
            "task": args.task,
            "training_dataset": dataset["id"],
            "template": TEMPLATE,
            "hyperparameters": {"steps": args.steps, "batch_size": args.batch_size},
        },
    )
    job.raise_for_status()
    job = job.json()
    print(f"job {job['id']} queued")
    while job["status"] in ACTIVE_STATUSES:
        time.sleep(2)
        job = client.get(f"/v1/tuning/jobs/{job['id']}").json()
        print(
            f"  {job['status']} step {job['progress']['step']}/{job['progress']['total_steps']} "
            f"loss {job['metrics'].get('train_loss')}",
            flush=True,
        )
    if job["status"] != JobStatus.SUCCEEDED:
        print(f"job ended {job['status']}: {job['error']}")
        return 1
    created, started, finished = (
        datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")
    )
    print(f"job {job['id']} succeeded: {job['result']}; metrics {job['metrics']}")
    print(
        f"job wall time: {(finished - started).total_seconds():.1f} s training "
        f"({(finished - created).total_seconds():.1f} s from creation)"
    )

    labels = dataset["labels"]
    tuned = accuracy(client, dev, task=f"{args.task}@{job['result']['version']}", labels=labels)
    zero_shot = accuracy(client, dev, task=None, labels=labels, template=TEMPLATE)
    print(f"SST-2 dev accuracy on the first {len(dev)} rows: tuned {tuned:.3f}, zero-shot {zero_shot:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
