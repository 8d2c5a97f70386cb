"""docs/architecture.md is the map of the code: its package map names every module, so a module added
or moved without the map fails here."""

from __future__ import annotations

import re

from tests.paths import REPO


def test_the_package_map_names_every_module():
    text = (REPO / "docs/architecture.md").read_text()
    package_map = text[text.index("## The packages") : text.index("## The path of a request")]
    named = set(re.findall(r"([a-z_]+\.py)", package_map))
    modules = [
        path
        for root in ("app", "workers")
        for path in (REPO / root).rglob("*.py")
        if path.name != "__init__.py"
    ]
    missing = sorted(str(p.relative_to(REPO)) for p in modules if p.name not in named)
    assert not missing, f"docs/architecture.md does not name: {missing}"
