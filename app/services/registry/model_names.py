"""What a `model` names on the OpenAI-compatible surface: a base backbone, a tuned version
(`ft:<backbone>:<task>:<version>`), or a task reference as the native routes take it ('sst2', 'sst2@3')."""

from __future__ import annotations

import re

from app.errors import NotFound

NUMBER = re.compile(r"[1-9][0-9]{0,18}")  # a positive integer as ids and versions are written


def fine_tuned_model(backbone: str, task: str, version: int) -> str:
    return f"ft:{backbone}:{task}:{version}"


def missing(model: str) -> NotFound:
    """The one answer for a model that is not there, whatever the reason."""
    return NotFound(f"The model {model!r} does not exist.", param="model", code="model_not_found")


def task_ref_of_model(model: str, backbones: set[str]) -> tuple[str | None, str | None]:
    """(backbone, task reference) that ``model`` names: a backbone alone (no task), a tuned version, or a
    task reference (no backbone named)."""
    if model in backbones:
        return model, None
    if model.startswith("ft:"):
        parts = model.split(":")
        if len(parts) != 4 or not NUMBER.fullmatch(parts[3]):
            raise NotFound(
                f"The model {model!r} does not exist: a tuned model is named ft:<backbone>:<task>:<version>.",
                param="model",
                code="model_not_found",
            )
        return parts[1], f"{parts[2]}@{parts[3]}"
    return None, model
