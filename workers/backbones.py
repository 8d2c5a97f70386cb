"""Backbones of this worker process, each loaded once and kept for every later job."""

from __future__ import annotations

import logging
import threading

from app.config import get_settings
from app.ml.backbone import Backbone, load_backbone, materialize_backbone

log = logging.getLogger(__name__)
_loaded: dict[str, Backbone] = {}
_lock = threading.Lock()


def get_backbone(name: str) -> Backbone:
    with _lock:
        if name not in _loaded:
            settings = get_settings()
            path = materialize_backbone(name, settings.backbones[name], settings.backbone_cache_dir)
            _loaded[name] = load_backbone(name, path, device=settings.device)
            log.info("loaded backbone %s from %s", name, path)
        return _loaded[name]
