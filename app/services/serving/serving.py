"""Inference for the API process: resolve a task to a prompt version, keep decoded prompts in memory, and
hand requests to the engine that owns the model."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import Method
from app.db.models import PromptVersion
from app.db.session import session_scope
from app.errors import DomainError, InferenceFailed, InvalidRequest, NotFound, PromptCorrupt, Unavailable
from app.ml import inference
from app.ml.backbone import Backbone
from app.ml.engine import Call, Engine, Observer
from app.ml.prompt_check import prompt_fault
from app.ml.prompt_kv import report_load
from app.ml.row import Generation, GenerationRequest, Row
from app.ml.soft_prompt import prompt_from_bytes, stored_shape, virtual_tokens
from app.ml.text import render
from app.services.datasets.labels import LabelLimits, check_labels
from app.services.registry import prompts as prompts_service
from app.services.registry.model_names import missing, task_ref_of_model
from app.services.serving import limits
from app.services.serving.version_cache import NAMES, PromptTensors, RegistryMark, SingleFlight


@dataclass(frozen=True)
class ResolvedTask:
    """What a request needs from the version a task reference names, taken together: a reader never mixes
    two versions. The bare backbone is BARE."""

    task: str | None
    version: int | None
    template: str
    labels: list[str] | None
    soft_prompt: torch.Tensor | None  # [k, d] float32: the learned virtual tokens (None: the bare backbone)
    key: tuple[int, str] | None  # (version row id, checksum): names the immutable content


RESOLVED_REFS = 4096
BARE = ResolvedTask(task=None, version=None, template="{input}", labels=None, soft_prompt=None, key=None)


class Serving:
    def __init__(self, settings: Settings, backbone: Backbone | None, observer: Observer | None = None):
        self.settings = settings
        self.backbone = backbone
        self.observer = observer
        self.prompts = PromptTensors(settings.prompt_cache_bytes, observer)
        self._loads = SingleFlight()
        # (tenant id, ref) -> (resolved, the registry's mark then), least recently used first: valid while
        # the mark is current, so a task without a version follows new versions within the mark's TTL. The
        # tenant is part of the key: a name resolved for one tenant means nothing for another.
        self._refs: OrderedDict[tuple[int, str], tuple[ResolvedTask, Hashable]] = OrderedDict()
        self._refs_lock = threading.Lock()
        self._mark = RegistryMark(self._read_mark, settings.task_resolve_ttl_s)
        self.engine: Engine | None = None
        if backbone is not None:
            self.engine = engine_from(settings, backbone, observer).start()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def require_backbone(self) -> Backbone:
        return self._require_engine().backbone

    def prompt_fault(self, prompt: torch.Tensor, *, tenant_id: int) -> str | None:
        """``app.ml.prompt_check.prompt_fault`` on the engine's thread, which owns the backbone: it takes
        its turn like any tenant's call. Blocks until it has run."""
        engine = self._require_engine()
        return engine.call(lambda backbone: prompt_fault(backbone, prompt), rows=1, tenant=tenant_id).result()

    def count_tokens(self, text: str) -> int:
        return len(self.require_backbone().tokenizer(text, add_special_tokens=False)["input_ids"])

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable(
                "The backbone is not loaded in this process; inference is unavailable.",
                code="engine_not_ready",
                retry_after_s=10,
            )
        return self.engine

    def resolve_task(self, *, tenant_id: int, ref: str | None) -> ResolvedTask:
        """The version ``ref`` names among the tenant's, decoded. Blocking (the registry on a miss), so
        called off the event loop; the read has a session of its own, closed before the engine runs."""
        if ref is None:
            self._require_engine()
            return BARE
        mark, key = self._mark.current(), (tenant_id, ref)
        with self._refs_lock:
            cached = self._refs.get(key)
            fresh = cached is not None and cached[1] == mark
            if fresh:
                self._refs.move_to_end(key)
        if self.observer is not None:
            self.observer.cache_counted(NAMES, "hit" if fresh else "miss")
        if fresh:
            return cached[0]
        return self._loads.run(key, lambda: self._load(tenant_id=tenant_id, ref=ref, mark=mark))

    def _read_mark(self) -> Hashable:
        with session_scope(self.settings.registry_url) as session:
            return prompts_service.registry_mark(session)

    def _load(self, *, tenant_id: int, ref: str, mark: Hashable) -> ResolvedTask:
        """``ref`` read from the registry (one load for every request that waits on it meanwhile), kept
        under the registry's ``mark`` it was read at."""
        started = time.perf_counter()
        with session_scope(self.settings.registry_url) as session:
            resolved = self._read(session, tenant_id=tenant_id, ref=ref)
        evicted = 0
        with self._refs_lock:
            self._refs[(tenant_id, ref)] = (resolved, mark)
            while len(self._refs) > RESOLVED_REFS:
                self._refs.popitem(last=False)  # the least recently used; it costs one query to redo
                evicted += 1
        seconds = time.perf_counter() - started
        report_load(self.observer, NAMES, seconds=seconds, evictions=evicted, held=None)
        return resolved

    def _read(self, session: Session, *, tenant_id: int, ref: str) -> ResolvedTask:
        engine = self._require_engine()
        row = prompts_service.find_version(session, tenant_id=tenant_id, ref=ref, with_vectors=False)
        if row.base_model != engine.backbone.name:
            raise InvalidRequest(
                f"Task {ref!r} was trained on {row.base_model!r}, but this server serves "
                f"{engine.backbone.name!r}.",
                param="task",
                code="base_model_not_served",
            )
        key = (row.id, row.sha256)
        prompt = self.prompts.get(key)
        if prompt is None:
            started = time.perf_counter()
            shape = stored_shape(engine.backbone, Method(row.method))
            prompt = self._decode(session, row_id=row.id, shape=shape, ref=ref)
            self.prompts.put(key, prompt, load_seconds=time.perf_counter() - started)
        return ResolvedTask(
            task=prompts_service.parse_task_ref(ref)[0],
            version=row.version,
            template=row.template,
            labels=row.labels,
            soft_prompt=prompt,
            key=key,
        )

    def resolve_model(self, *, tenant_id: int, model: str) -> ResolvedTask:
        """The prompt to serve an OpenAI-style ``model`` with: none for the backbone this server runs,
        else the version it names among the tenant's own; anything else is a missing model."""
        served = self.require_backbone().name
        backbone, ref = task_ref_of_model(model, {served})
        if backbone is not None and backbone != served:
            raise missing(model)
        if ref is None:
            return BARE
        try:
            prompts_service.parse_task_ref(ref)
            return self.resolve_task(tenant_id=tenant_id, ref=ref)
        except NotFound:
            raise missing(model) from None
        except InvalidRequest as error:
            if error.code != "base_model_not_served":  # a name no task could have ('gpt-3.5-turbo')
                raise missing(model) from None
            error.param = "model"
            raise

    @staticmethod
    def _decode(session: Session, *, row_id: int, shape: tuple[int | None, ...], ref: str) -> torch.Tensor:
        return decode_version(session.get(PromptVersion, row_id), shape=shape, ref=ref)

    def render_inputs(
        self, resolved: ResolvedTask, inputs: list[str], *, n: int = 1
    ) -> tuple[list[str], list[int]]:
        """Templated inputs and their token counts, refused before any model work when too many or too
        long (app/services/serving/limits.py)."""
        engine = self._require_engine()
        limits.check_input_count(self.settings, len(inputs), n=n)
        texts = [render(resolved.template, text) for text in inputs]
        lengths = [
            len(ids) for ids in engine.backbone.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]
        limits.check_input_lengths(
            self.settings, lengths, virtual_tokens=virtual_tokens(resolved.soft_prompt)
        )
        return texts, lengths

    def generation_requests(
        self, resolved: ResolvedTask, texts: list[str], *, tenant_id: int, **options
    ) -> list[GenerationRequest]:
        """Tokenised and checked against the window here, in the request's thread, before anything queues."""
        engine = self._require_engine()
        return inference.generation_requests(
            engine.backbone,
            tenant=tenant_id,
            prompts=[resolved.soft_prompt] * len(texts),
            prompt_keys=[resolved.key] * len(texts),
            texts=texts,
            **options,
        )

    def start_generation(self, requests: list[GenerationRequest]) -> GenerationHandle:
        """Queue the rows now (Overloaded at once when full); read them from the handle."""
        return GenerationHandle(self._require_engine(), requests)

    def classification_labels(
        self, resolved: ResolvedTask, labels: list[str] | None, inputs: int
    ) -> list[str]:
        """The labels a classification scores (the request's, else the task's), refused past the limits on
        their number, each one's tokens, and the request's work: its inputs times all labels' tokens."""
        if labels is None:
            labels = resolved.labels
            if not labels:
                raise InvalidRequest("This task has no label set; pass labels.", param="labels")
        tokens = check_labels(
            labels, limits=LabelLimits.of(self.settings), count_tokens=self.count_tokens, min_labels=1
        )
        limits.check_classify_work(self.settings, inputs=inputs, label_tokens=sum(tokens))
        return labels

    def start_classification(
        self, resolved: ResolvedTask, texts: list[str], labels: list[str], *, tenant_id: int
    ) -> Call:
        """Queue the scoring now (Overloaded at once when full); the call's result is one {label: p} per
        input. It runs in chunks that take turns with other requests' work."""
        engine = self._require_engine()
        return engine.call(
            lambda backbone: inference.classify_steps(
                backbone,
                prompts=[resolved.soft_prompt] * len(texts),
                texts=texts,
                labels=labels,
                prompt_keys=[resolved.key] * len(texts),
                kv_cache=engine.prompt_kv_cache,
                chunk_tokens=self.settings.engine_chunk_tokens,
            ),
            rows=len(texts),
            tenant=tenant_id,
        )


def engine_from(settings: Settings, backbone: Backbone, observer: Observer | None = None) -> Engine:
    """The engine the settings describe (SOFTPROMPT_ENGINE_*), not started yet."""
    return Engine(
        backbone,
        max_batch_rows=settings.engine_max_batch_rows,
        max_queued_rows=settings.engine_max_queued_rows,
        max_tenant_rows=settings.engine_max_tenant_rows,
        admit_every_steps=settings.engine_admit_every_steps,
        prefill_tokens=settings.engine_prefill_tokens,
        prefill_chunk_tokens=settings.engine_prefill_chunk_tokens,
        max_batch_tokens=settings.engine_max_batch_tokens,
        observer=observer,
        prompt_kv_cache_bytes=settings.prompt_kv_cache_bytes,
    )


@dataclass
class RowUpdate:
    index: int  # which input of the request
    text: str  # text that became final since the last update of this row
    finished: Generation | None  # set on the row's last update


class GenerationHandle:
    """The caller's end of a request's rows: updates arrive from the engine thread into this event loop.
    Leaving early (a client that went away) cancels the rows still running."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]):
        self._loop = asyncio.get_running_loop()
        self._updates: asyncio.Queue[tuple[Row, str, bool]] = asyncio.Queue()
        self._rows = engine.submit(requests, self._on_update)
        self._index = {id(s): i for i, s in enumerate(self._rows)}
        self._open = len(self._rows)

    def _on_update(self, row: Row, delta: str, over: bool) -> None:
        self._loop.call_soon_threadsafe(self._updates.put_nowait, (row, delta, over))

    def cancel(self) -> None:
        for row in self._rows:
            row.cancelled = True

    async def updates(self) -> AsyncIterator[RowUpdate]:
        try:
            while self._open:
                row, delta, over = await self._updates.get()
                if isinstance(row.error, DomainError):
                    raise row.error
                if row.error is not None:
                    raise InferenceFailed(f"Inference failed: {type(row.error).__name__}.") from row.error
                self._open -= over
                yield RowUpdate(self._index[id(row)], delta, row.result() if over else None)
        finally:
            if self._open:
                self.cancel()

    async def results(self) -> list[Generation]:
        results: list[Generation | None] = [None] * len(self._rows)
        async for update in self.updates():
            if update.finished is not None:
                results[update.index] = update.finished
        return results


def decode_version(
    row: PromptVersion, *, shape: tuple[int | None, ...], ref: str, param: str = "task"
) -> torch.Tensor:
    """A version's soft prompt, checked against its checksum and the backbone's ``shape``."""
    if hashlib.sha256(row.vectors).hexdigest() != row.sha256:
        raise PromptCorrupt(f"Prompt version {ref!r} fails its checksum; retrain or delete it.", param=param)
    try:
        return prompt_from_bytes(row.vectors, shape=shape)
    except PromptCorrupt as error:
        raise PromptCorrupt(f"Prompt version {ref!r} is unusable: {error.message}", param=param) from None
