from __future__ import annotations

import pytest

from app.ml.backbone import Backbone, load_backbone
from tests.fixtures.tiny_backbone import write_tiny_backbone, write_tiny_family
from tests.stacks import STACK_IDS, MigratedTemplates


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
