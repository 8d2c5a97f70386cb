"""bench/gpu_check.py in its reduced form (no GPU here): every check runs and passes on the tiny backbone, so
the script is ready the day it meets a GPU."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO


def test_the_gpu_check_runs_its_reduced_form_and_passes(tiny_backbone_dir):
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--backbone", str(tiny_backbone_dir), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    checks = [line for line in table if line.endswith("| pass |")]
    assert len(checks) == 7, done.stdout  # 3 per method, and the mixed-task batch
    assert any("decoder tokens/s, batch 4" in line for line in table), done.stdout
    assert "0 of 7 checks failed" in done.stdout
