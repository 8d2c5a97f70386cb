"""The Dockerfile and compose file name commands the `softprompt` CLI really has (no Docker engine runs in
CI, so their commands are checked against the CLI instead of by starting containers)."""

from __future__ import annotations

import json
import re

import yaml
from typer.testing import CliRunner

from app.cli import cli
from tests.paths import REPO


def _accepts(args: list[str]) -> bool:
    result = CliRunner().invoke(cli, [*args, "--help"])
    return result.exit_code == 0


def test_compose_commands_exist_in_the_cli():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = {
        name: service["command"] for name, service in compose["services"].items() if "build" in service
    }
    assert set(commands) == {"migrate", "api", "worker"}
    for name, command in commands.items():
        assert _accepts(command), (name, command)
    assert compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] == ["gpu"]


def test_dockerfile_entrypoint_is_the_cli():
    text = (REPO / "Dockerfile").read_text()
    assert json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)) == ["softprompt"]
    assert _accepts(json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1)))
