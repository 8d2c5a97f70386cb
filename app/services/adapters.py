"""Prompt versions in and out as PEFT prompt-tuning adapters (app/ml/peft_format.py has the format)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db.models import PromptVersion
from app.errors import InvalidRequest, PromptCorrupt
from app.ml.backbone import Backbone
from app.ml.peft_format import export_zip, import_zip
from app.ml.soft_prompt import prompt_from_bytes, prompt_to_bytes
from app.ml.text import INPUT_PLACEHOLDER
from app.services import prompts
from app.services.jobs import TASK_NAME


@dataclass(frozen=True)
class Export:
    filename: str
    data: bytes


def export_version(
    session: Session, *, tenant_id: int, name: str, version: int, backbone: Backbone | None
) -> Export:
    row = prompts.get_version(session, tenant_id=tenant_id, name=name, version=version, with_vectors=True)
    if hashlib.sha256(row.vectors).hexdigest() != row.sha256:
        raise PromptCorrupt(f"Prompt version {name}@{version} fails its checksum; it cannot be exported.")
    prompt = prompt_from_bytes(row.vectors, embedding_dim=row.embedding_dim)
    config = backbone.model.config if backbone is not None and backbone.name == row.base_model else None
    about = {
        "task": name,
        "version": version,
        "template": row.template,
        "labels": row.labels,
        "kind": row.kind,
        "sha256": row.sha256,
    }
    data = export_zip(prompt=prompt, base_model=row.base_model, backbone_config=config, about=about)
    return Export(filename=f"{name}-v{version}-peft.zip", data=data)


def import_version(
    session: Session,
    *,
    tenant_id: int,
    name: str,
    data: bytes,
    template: str | None,
    labels: list[str] | None,
    backbone: Backbone,
    max_virtual_tokens: int,
) -> PromptVersion:
    """A new version of ``name`` (made if new) from a PEFT adapter zip, for the served backbone. The
    template and labels come from the request, else from our own export's softprompt.json."""
    if not TASK_NAME.fullmatch(name):
        raise InvalidRequest(
            f"Task name {name!r} is not valid: use 1-64 characters of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit.",
            param="task",
        )
    adapter = import_zip(data, backbone=backbone)
    if adapter.prompt.shape[0] > max_virtual_tokens:
        raise InvalidRequest(
            f"The adapter has {adapter.prompt.shape[0]} virtual tokens; the limit is {max_virtual_tokens}.",
            param="file",
            code="invalid_adapter",
        )
    template = template if template is not None else adapter.about.get("template")
    if not isinstance(template, str):
        raise InvalidRequest(
            "template is required: the text around each input, with {input} where it goes.", param="template"
        )
    if template.count(INPUT_PLACEHOLDER) != 1:
        raise InvalidRequest(f"template must contain {INPUT_PLACEHOLDER} exactly once.", param="template")
    labels = labels if labels is not None else adapter.about.get("labels")
    if labels is not None and (
        not isinstance(labels, list)
        or len(labels) < 2
        or len(set(labels)) != len(labels)
        or not all(isinstance(label, str) and label.strip() for label in labels)
    ):
        raise InvalidRequest("labels must be at least two distinct, non-empty strings.", param="labels")
    return prompts.add_version(
        session,
        tenant_id=tenant_id,
        name=name,
        vectors=prompt_to_bytes(adapter.prompt),
        base_model=backbone.name,
        num_virtual_tokens=adapter.prompt.shape[0],
        embedding_dim=backbone.embedding_dim,
        template=template,
        labels=labels,
        kind="classification" if labels else "generation",
        metrics={
            "imported_from": "peft",
            "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        },
    )
