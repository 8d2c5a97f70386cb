from __future__ import annotations

import os

import pytest
import torch

from app.ml.backbone import Backbone, load_backbone
from tests.fixtures.tiny_backbone import write_tiny_backbone, write_tiny_family
from tests.stacks import STACK_IDS, MigratedTemplates

# The suite runs two test processes at once (pytest-xdist, pyproject.toml), each starting servers and
# workers of its own: each process computes on one thread, so torch's threads never outnumber the cores
# and spin against each other. The processes the tests start inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="session")
def unsupported_backbone_dir(tmp_path_factory):
    """A model directory a team might configure that cannot run soft prompts (BERT attends both ways)."""
    return write_tiny_family(tmp_path_factory.mktemp("bert_backbone"), "bert")


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory):
    """Registries at the newest revision, migrated once for the session (tests/stacks.py)."""
    templates = MigratedTemplates(tmp_path_factory.mktemp("registry_templates"))
    yield templates
    templates.close()


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir) -> Backbone:
    return load_backbone("tiny", tiny_backbone_dir, device="cpu")


def pytest_collection_modifyitems(items):
    """The suite runs on two processes (pytest-xdist, pyproject.toml). The tests that start processes of
    their own go first, the real backbone's (one group, on one process: tests/e2e/conftest.py) before all,
    so the short tests fill in around them."""
    items.sort(
        key=lambda item: (
            0 if item.get_closest_marker("e2e") else 1 if item.get_closest_marker("worker") else 2
        )
    )


def pytest_terminal_summary(terminalreporter):
    """One line per stack, so a CI log shows the suite really ran against PostgreSQL and Redis."""
    for stack in STACK_IDS:

        def count(outcome: str, stack: str = stack) -> int:
            return sum(
                1 for r in terminalreporter.stats.get(outcome, []) if f"[{stack}" in getattr(r, "nodeid", "")
            )

        failed = count("failed") + count("error")
        terminalreporter.write_line(
            f"stack {stack}: {count('passed')} tests passed, {failed} failed, {count('skipped')} skipped"
        )
