"""Prompt versions in and out as PEFT prompt-tuning adapters (app/ml/peft_format.py has the format)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import DatasetKind, Method
from app.db.models import PromptVersion
from app.errors import InvalidRequest, PromptCorrupt
from app.input_text import check_text, text_fault
from app.ml.backbone import Backbone
from app.ml.peft_format import ImportedAdapter, export_zip, import_zip
from app.ml.soft_prompt import PROMPT_KEY, loose_shape, prompt_from_bytes, prompt_to_bytes, virtual_tokens
from app.services.datasets.labels import LabelLimits, check_labels
from app.services.registry import prompts
from app.services.registry.prompts import check_task_name, check_template
from app.services.tenancy import quotas
from app.services.tenancy.tenants import Caller


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
    prompt = prompt_from_bytes(row.vectors, shape=loose_shape(Method(row.method), row.embedding_dim))
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
    caller: Caller,
    name: str,
    data: bytes,
    template: str | None,
    labels: list[str] | None,
    backbone: Backbone,
    settings: Settings,
    prompt_fault: Callable[[torch.Tensor], str | None],
) -> PromptVersion:
    """A new version of ``name`` (made if new) from a PEFT adapter zip, for the served backbone. The
    template and labels come from the request, else from our own export's softprompt.json. An import is an
    upload: it counts toward the tenant's hourly upload bytes and obeys the limits a job's version does.
    ``prompt_fault`` says what makes the adapter's soft prompt unsafe to serve beside other tenants' rows
    (app/ml/prompt_check.py). Everything is checked before anything is written."""
    check_task_name(name)
    quotas.check_upload(session, caller=caller, size=len(data))
    adapter = import_zip(data, backbone=backbone, max_unzipped_bytes=settings.max_adapter_unzipped_bytes)
    k = virtual_tokens(adapter.prompt)
    if k > settings.max_virtual_tokens:
        raise InvalidRequest(
            f"The adapter has {k} virtual tokens; the limit is {settings.max_virtual_tokens}.",
            param="file",
            code="invalid_adapter",
        )
    template, labels = _template_and_labels(adapter, template, labels, backbone=backbone, settings=settings)
    # Last: it runs the backbone on the engine's thread (about 0.4 s on 2 cores), so an import refused for
    # its template or labels costs no one else anything.
    fault = prompt_fault(adapter.prompt)
    if fault is not None:
        raise InvalidRequest(
            f"Not a usable PEFT adapter: {PROMPT_KEY} {fault}.", param="file", code="invalid_adapter"
        )
    return prompts.add_version(
        session,
        tenant_id=caller.tenant_id,
        name=name,
        vectors=prompt_to_bytes(adapter.prompt),
        base_model=backbone.name,
        method=adapter.method,
        num_virtual_tokens=k,
        embedding_dim=backbone.embedding_dim,
        template=template,
        labels=labels,
        kind=DatasetKind.CLASSIFICATION if labels else DatasetKind.GENERATION,
        metrics={
            "imported_from": "peft",
            "base_model_name_or_path": _plain(adapter.config.get("base_model_name_or_path")),
        },
        upload_bytes=len(data),
    )


def _template_and_labels(
    adapter: ImportedAdapter,
    template: str | None,
    labels: list[str] | None,
    *,
    backbone: Backbone,
    settings: Settings,
) -> tuple[str, list[str] | None]:
    """The request's template and labels, else those our own export wrote into the zip, checked."""
    template = template if template is not None else adapter.about.get("template")
    if not isinstance(template, str):
        raise InvalidRequest(
            "template is required: the text around each input, with {input} where it goes.", param="template"
        )
    check_text(template, param="template")
    check_template(template, max_chars=settings.max_template_chars)
    labels = labels if labels is not None else adapter.about.get("labels")
    if labels is not None:
        check_labels(
            labels, limits=LabelLimits.of(settings), count_tokens=_token_counter(backbone), param="labels"
        )
    return template, labels


def _token_counter(backbone: Backbone):
    return lambda text: len(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain(value: object) -> str | None:
    """A string from the adapter's own config, kept only if it is text the registry can hold."""
    return value if isinstance(value, str) and text_fault(value) is None and len(value) <= 1000 else None
