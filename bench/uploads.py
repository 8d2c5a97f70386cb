"""Refusing bad uploads fast: every malformed case of ../shared/RELIABILITY.md as a 10 MB file, through HTTP.

    .venv/bin/python bench/uploads.py            # about a minute on 2 cores

Each file is SST-2 training rows repeated to 10 MB with its fault on the last line where the case allows
it, so the whole file is read before the fault shows (the worst case). `softprompt api` runs with the
default backbone, whose tokenizer finds the example that is too long. Prints, per case, the status, the
error code and line, the seconds from sending the request to the answer, and whether anything was stored.
Target: every malformed case answered in under 2 s (the one over the size limit is 60 MB, and is refused
by its declared length before the body is read).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from bench.serving import start_api  # noqa: E402

SIZE = 10_000_000
TARGET_S = 2.0
ROWS = (ROOT.parent / "shared/data/sst2/train.jsonl").read_text().splitlines()


def repeated(rows: list[str], size: int = SIZE) -> list[str]:
    """``rows`` repeated until their text is ``size`` bytes long."""
    lines, total = [], 0
    while total < size:
        for row in rows:
            lines.append(row)
            total += len(row) + 1
            if total >= size:
                break
    return lines


def as_csv(row: str) -> str:
    record = json.loads(row)
    return '"{}",{}'.format(record["text"].replace('"', '""'), record["label"])


def text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def cases() -> list[tuple[str, str, bytes]]:
    """(case, file name, content): the valid file first, then one per malformed case."""
    rows, table = repeated(ROWS), ["text,label", *repeated([as_csv(row) for row in ROWS])]
    too_long = json.dumps({"text": "long " * 20_000, "label": "positive"})
    one_label = [row.replace('"negative"', '"positive"') for row in rows]
    return [
        ("valid (for reference)", "ok.jsonl", text(rows)),
        (
            "valid with BOM and CRLF (for reference)",
            "ok.jsonl",
            b"\xef\xbb\xbf" + text(rows).replace(b"\n", b"\r\n"),
        ),
        ("empty file", "empty.jsonl", b""),
        ("invalid JSON on the last line", "d.jsonl", text([*rows, '{"text": "broken", "label": '])),
        ("not UTF-8 on the last line", "d.jsonl", text(rows) + b'{"text": "caf\xe9", "label": "positive"}\n'),
        ("a line that is not an object", "d.jsonl", text([*rows, '["text", "label"]'])),
        ("a missing field", "d.jsonl", text([*rows, '{"text": "no label"}'])),
        ("a mistyped field", "d.jsonl", text([*rows, '{"text": ["a", "list"], "label": "positive"}'])),
        ("mixed record shapes", "d.jsonl", text([*rows, '{"input": "2+2", "output": "4"}'])),
        ("CSV row with the wrong column count", "d.csv", text([*table, "a,b,c,d"])),
        ("CSV without a header", "d.csv", text(table[1:])),
        ("a single label", "d.jsonl", text(one_label)),
        ("an example over the backbone's limit", "d.jsonl", text([*rows[: len(rows) - 30], too_long])),
        ("a compressed blob", "d.jsonl", gzip.compress(text(repeated(ROWS, 4 * SIZE)), 1)),
        ("a binary blob", "d.jsonl", os.urandom(SIZE)),
        ("too few examples", "d.jsonl", text(rows[:1])),
        ("over the size limit (50 MB)", "big.jsonl", text(repeated(ROWS, 6 * SIZE))),
        ("a multipart body without a file", "", b""),
    ]


def _count(client: httpx.Client) -> int:
    page = client.get("/v1/datasets", params={"limit": 100})
    assert page.status_code == 200, page.text
    return len(page.json()["data"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as data_dir:
        env = {
            **os.environ,
            "SOFTPROMPT_DATA_DIR": data_dir,
            "SOFTPROMPT_BACKBONE_DIR": str(ROOT / ".cache/backbones"),
        }
        upgrade(Settings(data_dir=Path(data_dir)).registry_url)
        server = start_api(env, args.port)
        slowest = 0.0
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120) as client:
                print(f"{'case':42} {'size':>8} {'status':>6} {'code':24} {'line':>7} {'seconds':>7}  stored")
                for case, name, content in cases():
                    before = _count(client)
                    start = time.perf_counter()
                    if name:
                        response = client.post("/v1/datasets", files={"file": (name, content)})
                    else:
                        response = client.post("/v1/datasets", files={"name": (None, "no file")})
                    seconds = time.perf_counter() - start
                    stored = _count(client) - before
                    body = response.json()
                    error = body.get("error", {})
                    print(
                        f"{case:42} {len(content) / 1e6:6.1f}MB {response.status_code:>6} "
                        f"{error.get('code', '-'):24} {error.get('line') or '-':>7} {seconds:7.2f}  {stored}"
                    )
                    if not case.endswith("(for reference)"):
                        assert response.status_code >= 400 and stored == 0, (case, body)
                        slowest = max(slowest, seconds)
                    else:
                        assert response.status_code == 201, (case, body)
        finally:
            server.terminate()
            server.wait()
    verdict = "met" if slowest < TARGET_S else "NOT met"
    print(f"slowest malformed case: {slowest:.2f} s (target < {TARGET_S:.0f} s): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
