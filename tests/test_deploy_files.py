"""The Dockerfile and compose file name commands the `softprompt` CLI really has (no Docker engine runs in
CI, so their commands are checked against the CLI instead of by starting containers), and the compose file
passes `docker compose config` (which needs no engine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

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


def test_compose_file_passes_docker_compose_config():
    """Compose's own validation: unknown keys, bad depends_on conditions, malformed GPU reservations."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose"]
    else:
        assert shutil.which("docker-compose"), (
            "docker compose or docker-compose is needed: `make test` installs it"
        )
        command = ["docker-compose"]
    checked = subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    # The RabbitMQ variant, an override file: every process of the service gets its broker.
    files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(REPO / "docker-compose.rabbitmq.yml")]
    merged = subprocess.run([*command, *files, "config"], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    for name in ("migrate", "api", "worker"):
        assert services[name]["environment"]["SOFTPROMPT_BROKER_URL"].startswith("amqp://"), name
    assert services["worker"]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
