from __future__ import annotations

import pytest

from app.ml.backbone import Backbone, load_backbone
from tests.fixtures.tiny_backbone import write_tiny_backbone


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    return write_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir) -> Backbone:
    return load_backbone("tiny", tiny_backbone_dir, device="cpu")
