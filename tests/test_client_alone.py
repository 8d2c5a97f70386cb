"""The client (app/client.py and its CLI) is what a product backend installs: it must load where the
server's stack cannot, with the contract (app/contract/) as its only part of the service."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO

BLOCKED = ("torch", "transformers", "sqlalchemy", "fastapi", "app.db", "app.services", "app.ml", "app.api")
PROBE = f"""
import sys

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.startswith({BLOCKED!r}):
            raise ImportError("not installed here: " + name)

sys.meta_path.insert(0, Missing())
import app.client, app.client_cli
print(sorted(m for m in sys.modules if m.startswith("app.")))
"""


def test_the_client_loads_without_torch_the_database_or_the_server():
    loaded = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    modules = eval(loaded.stdout)  # noqa: S307 - the list the probe printed
    assert "app.client" in modules and "app.contract.schemas" in modules
    assert not [m for m in modules if m.startswith(BLOCKED)]
