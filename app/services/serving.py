"""Inference for the API process: resolves a task to a prompt version, keeps decoded prompts in memory,
admits a bounded number of requests and runs each request's inputs as one batch on the loaded backbone."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import PromptVersion
from app.errors import InvalidRequest, Overloaded, PromptCorrupt, Unavailable
from app.ml import inference
from app.ml.backbone import Backbone
from app.ml.soft_prompt import prompt_from_bytes
from app.ml.text import render
from app.services import prompts as prompts_service

PROMPT_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class ResolvedPrompt:
    task: str | None
    version: int | None
    template: str
    labels: list[str] | None
    prompt: torch.Tensor | None  # [k, d] float32


class Serving:
    def __init__(self, settings: Settings, backbone: Backbone | None):
        self.settings = settings
        self.backbone = backbone
        self._prompts: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._admitted = 0
        self._admission = threading.Lock()
        # One batch at a time on the model: torch already spreads one forward pass over every core.
        self._model_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.backbone is not None

    def _require_backbone(self) -> Backbone:
        if self.backbone is None:
            raise Unavailable(
                "The backbone is not loaded in this process; inference is unavailable.",
                code="engine_not_ready",
                headers={"Retry-After": "10"},
            )
        return self.backbone

    def resolve(self, session: Session, ref: str | None) -> ResolvedPrompt:
        backbone = self._require_backbone()
        if ref is None:
            return ResolvedPrompt(task=None, version=None, template="{input}", labels=None, prompt=None)
        row = prompts_service.resolve(session, ref=ref, with_vectors=False)
        if row.base_model != backbone.name:
            raise InvalidRequest(
                f"Task {ref!r} was trained on {row.base_model!r}, but this server serves {backbone.name!r}.",
                param="task",
                code="base_model_not_served",
            )
        key = (row.id, row.sha256)
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = self._decode(session, row_id=row.id, embedding_dim=backbone.embedding_dim, ref=ref)
            self._prompts[key] = prompt
            while len(self._prompts) > PROMPT_CACHE_ENTRIES:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return ResolvedPrompt(
            task=prompts_service.parse_task_ref(ref)[0],
            version=row.version,
            template=row.template,
            labels=row.labels,
            prompt=prompt,
        )

    @staticmethod
    def _decode(session: Session, *, row_id: int, embedding_dim: int, ref: str) -> torch.Tensor:
        row = session.get(PromptVersion, row_id)
        if hashlib.sha256(row.vectors).hexdigest() != row.sha256:
            raise PromptCorrupt(
                f"Prompt version {ref!r} fails its checksum; retrain or delete it.", param="task"
            )
        try:
            return prompt_from_bytes(row.vectors, embedding_dim=embedding_dim)
        except PromptCorrupt as error:
            raise PromptCorrupt(
                f"Prompt version {ref!r} is unusable: {error.message}", param="task"
            ) from None

    def render_inputs(self, resolved: ResolvedPrompt, inputs: list[str]) -> tuple[list[str], list[int]]:
        """Templated inputs and their token counts, refused before any model work when too many or too
        long."""
        backbone = self._require_backbone()
        limit = self.settings.max_batch_inputs
        if not inputs:
            raise InvalidRequest("input must not be empty.", param="input")
        if len(inputs) > limit:
            raise InvalidRequest(f"At most {limit} inputs per request; got {len(inputs)}.", param="input")
        texts = [render(resolved.template, text) for text in inputs]
        virtual = 0 if resolved.prompt is None else resolved.prompt.shape[0]
        lengths = [len(ids) for ids in backbone.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for index, length in enumerate(lengths):
            if length + virtual > self.settings.max_input_tokens:
                raise InvalidRequest(
                    f"input[{index}] is {length} tokens after the template (+{virtual} virtual tokens); the "
                    f"limit is {self.settings.max_input_tokens}.",
                    param="input",
                    code="input_too_long",
                )
        return texts, lengths

    async def run(self, work: Callable[[Backbone], object]) -> object:
        """Runs ``work`` on the model in a thread, or refuses at once when the queue is full."""
        backbone = self._require_backbone()
        with self._admission:
            if self._admitted >= self.settings.max_concurrent_inference:
                raise Overloaded(
                    f"The inference queue is full ({self.settings.max_concurrent_inference} "
                    "requests); retry shortly.",
                    headers={"Retry-After": "1"},
                )
            self._admitted += 1
        try:
            return await asyncio.to_thread(self._locked, work, backbone)
        finally:
            with self._admission:
                self._admitted -= 1

    def _locked(self, work: Callable[[Backbone], object], backbone: Backbone) -> object:
        with self._model_lock:
            return work(backbone)


def generate(
    backbone: Backbone, *, prompt: torch.Tensor | None, texts: list[str], **options
) -> list[inference.Generation]:
    return inference.generate(backbone, prompts=[prompt] * len(texts), texts=texts, **options)


def classify(
    backbone: Backbone, *, prompt: torch.Tensor | None, texts: list[str], labels: list[str]
) -> list[dict[str, float]]:
    return inference.classify(backbone, prompts=[prompt] * len(texts), texts=texts, labels=labels)
