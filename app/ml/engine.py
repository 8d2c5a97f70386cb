"""The generation engine: one thread owns the model and serves every request, a decoder step at a time.

Batching is iteration-level: a row that finishes leaves the batch at once and a waiting row joins at the
next step, so a long request never holds short ones back and the batch stays full under load. Rows of any
task share a step, each with its own prompt; a prompt's keys and values are computed once per version.
Tenants share fairly: free places go round-robin to the tenants with waiting rows, and each tenant may hold
only its share of the queue, so one tenant's flood neither delays another's rows nor fills the queue.

No piece of work is larger than it must be, and large work takes turns with small. Newcomers are prefilled
in groups of at most ``prefill_tokens`` tokens, and a tenant with no row running is admitted at once. A
group with an input longer than ``prefill_chunk_tokens`` is prefilled a chunk at a time (chunked
prefill), each chunk taking turns with a decoder step of the running rows or the admission of other
newcomers no longer than a chunk: a long input no longer pauses everyone for its whole prefill. The
running rows' keys and values are bounded by ``max_batch_tokens`` positions, a quarter of them kept for
tenants with no row running.
Calls (classification) run in chunks (app/ml/inference.py), one chunk per turn, the calls taking turns;
the engine's time is shared evenly between calls and decoder steps: after a chunk, steps run until they
have had as much time. So a small generation waits for at most the rest of one chunk, however large the
classification another tenant sent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from concurrent.futures import Future
from typing import Protocol

import torch

from app.errors import Overloaded, PromptCorrupt, Unavailable
from app.ml.backbone import Backbone
from app.ml.decode_batch import DecodeBatch, InlinePrompt, Prefill, decode_step, start_prefill
from app.ml.memory import release_freed_memory, share_arenas
from app.ml.prompt_kv import CacheObserver, PromptKV, PromptKVCache, compute_prompt_kv
from app.ml.row import UNDECODABLE, GenerationRequest, Row, choose_tokens
from app.ml.soft_prompt import is_prefix

log = logging.getLogger(__name__)
# Prompt keys and values evicted before the engine hands freed memory back: about 18 prompts of the default
# backbone, so a trim (a few milliseconds) is rare even when the cache turns over quickly.
RELEASE_AFTER_EVICTED_BYTES = 16 << 20
CALL_PROMPT_CACHE_BYTES = 256 << 20  # generate_all's own prompt cache, gone with the call
# What one more pass over the backbone's weights costs, in the columns (positions of one row) the same time
# runs inside a pass. Measured on the default backbone on 2 cores: a pass of 1 row takes 45.6 ms for 1
# column, 139 ms for 64 and 216 ms for 128, so about 1.34 ms a column after a fixed 44 ms (33 columns).
PASS_COLUMNS = 32


class Observer(CacheObserver, Protocol):
    """What the engine reports as it works (the API turns it into metrics); called on the engine thread."""

    def admitted(self, waited_seconds: list[float]) -> None: ...

    def stepped(self, rows: int, seconds: float) -> None: ...


# Called on the engine thread when a row has news: (row, text that became final, whether the row is over:
# finished, cancelled or failed). The last call for a row is the only one with True.
Listener = Callable[[Row, str, bool], None]


_NOBODY = object()  # no tenant served yet (None is a tenant: the anonymous one)


class Scheduler:
    """Forms batches across requests; no threads, so tests and offline callers can step it by hand."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_rows: int,
        prompt_kv_cache: PromptKVCache | None,
        admit_every_steps: int = 1,
        prefill_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        observer: Observer | None = None,
        prefill_chunk_tokens: int | None = None,
    ):
        self.backbone = backbone
        self.max_batch_rows = max_batch_rows
        # A prefill runs at most this many tokens at a time (None or 0: a prefill is one piece), and a
        # newcomer group that joins while a chunked prefill is under way is no longer than one chunk.
        self.prefill_chunk_tokens = prefill_chunk_tokens or None
        self.prefilling: Prefill | None = None  # a group part-way through its chunked prefill
        # Seconds of engine time the other work is owed: a chunk adds its length, other steps take theirs.
        # The next chunk waits while any is owed, so a long prefill and everything else share the engine
        # evenly, and a short request waits for at most one chunk however long the prefill.
        self._owed_to_others = 0.0
        self.prompt_kv_cache = prompt_kv_cache
        self.observer = observer
        # An admission's prefill runs at most this many input tokens (a longer row runs alone): it pauses
        # every running row, so its length is the delay it adds to everyone else's next token.
        self.prefill_tokens = prefill_tokens
        # The running rows' positions, as batch_tokens() counts them, bound the keys and values in memory.
        self.max_batch_tokens = max_batch_tokens
        # While rows are running, newcomers join at most every this many decoder steps. Each admission is a
        # prefill that pauses every running row, and it costs nearly as much for one newcomer as for eight:
        # grouping arrivals keeps a steady trickle of requests from spending the engine's time on prefills.
        self.admit_every_steps = admit_every_steps
        self._steps_since_admission = 0
        # Each tenant's waiting rows in FIFO order. The dict's order is the turn order: the front tenant
        # is served next and then goes to the back, so a tenant with one row waits for at most one row of
        # each other tenant, however many those have queued. A tenant leaves when its queue is empty.
        self.waiting: dict[Hashable | None, deque[Row]] = {}
        self.running: DecodeBatch | None = None
        self._listeners: dict[int, Listener] = {}
        self._served_last: object = _NOBODY

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running is None and self.prefilling is None

    def add(self, row: Row, listener: Listener) -> None:
        self._listeners[id(row)] = listener
        tenant = row.request.tenant
        if tenant not in self.waiting:
            self.waiting[tenant] = deque()
            # A tenant that starts waiting goes before the one served last, which has just had its turn.
            if self._served_last in self.waiting:
                self.waiting[self._served_last] = self.waiting.pop(self._served_last)
        self.waiting[tenant].append(row)

    def step(self) -> None:
        """The prefilling group's next chunk, on its turn; else admit waiting rows (a prefill, or the first
        chunk of one) if there is room; else advance the running rows by a token; else the next chunk."""
        if self.prefilling is not None and self._owed_to_others <= 0:
            self._chunk()
            return
        started = time.perf_counter()
        joining = self._joining()
        if joining:
            self._steps_since_admission = 0
            if self.observer is not None:
                now = time.monotonic()
                self.observer.admitted([now - s.queued_at for s in joining])
            chunked_before = self.prefilling is not None
            self._guarded(joining, lambda: self._admit(joining))
            if not chunked_before and self.prefilling is not None:  # a long group's first chunk
                self._owed_to_others += time.perf_counter() - started
                return
        elif self.running is not None:
            self._steps_since_admission += 1
            running = self.running
            self._guarded(running.rows, lambda: self._advance(running))
            if self.observer is not None:
                self.observer.stepped(len(running), time.perf_counter() - started)
        elif self.prefilling is not None:
            self._owed_to_others = 0.0  # nothing else to do: nothing to owe
            self._chunk()
            return
        self._owed_to_others = max(0.0, self._owed_to_others - (time.perf_counter() - started))

    def _chunk(self) -> None:
        started = time.perf_counter()
        self._guarded(self.prefilling.rows, self._continue_prefill)
        self._owed_to_others += time.perf_counter() - started

    def _joining(self) -> list[Row]:
        """The rows this step admits, taken in the tenants' turn order while they fit: in the batch's rows,
        in ``prefill_tokens`` for this prefill, and in ``max_batch_tokens`` for the batch's keys and values
        (an empty engine takes its first row whatever its size).

        While rows run, newcomers join every ``admit_every_steps`` steps, except a tenant with no row
        running: its rows join at once, so a small request does not wait for another tenant's cadence.
        Such a tenant may also use the last quarter of ``max_batch_tokens``, which tenants with rows
        running may not: one tenant's long rows cannot fill the batch against another's first one."""
        rows = self.running.rows if self.running is not None else []
        if self.prefilling is not None:
            rows = rows + self.prefilling.rows
        busy = {s.request.tenant for s in rows}
        used = sum(batch_tokens(s.request) for s in rows)
        due = not rows or self._steps_since_admission >= self.admit_every_steps
        joining: list[Row] = []
        prefilled = 0
        while len(rows) + len(joining) < self.max_batch_rows:
            first = not rows and not joining
            chosen = next(
                (
                    tenant
                    for tenant, queue in self.waiting.items()
                    if self._may_join(queue[0].request, tenant in busy, due, first, prefilled, used)
                ),
                _NOBODY,
            )
            if chosen is _NOBODY:
                break
            row = self._take(chosen)
            if row.cancelled and self._notify(row):
                continue
            joining.append(row)
            busy.add(chosen)
            used += batch_tokens(row.request)
            prefilled += len(row.request.context)
        return joining

    def _may_join(
        self, request: GenerationRequest, busy: bool, due: bool, first: bool, prefilled: int, used: int
    ) -> bool:
        """Whether a tenant's next row joins now (``busy``: the tenant has rows running)."""
        if busy and not due:
            return False  # its next admission comes with the cadence
        if first:
            return True  # an empty engine takes its first row whatever its size
        if self.prefilling is not None and prefilled + len(request.context) > self.prefill_chunk_tokens:
            return False  # beside a chunked prefill, newcomers no longer than a chunk, in one piece
        budget = self.prefill_tokens
        if prefilled and budget is not None and prefilled + len(request.context) > budget:
            return False  # a prefill of its own, later (a row longer than the budget has one alone)
        if self.max_batch_tokens is None:
            return True
        room = self.max_batch_tokens - (self.max_batch_tokens // 4 if busy else 0)
        return used + batch_tokens(request) <= room

    def _take(self, tenant: Hashable | None) -> Row:
        """``tenant``'s oldest waiting row; the tenant goes to the back of the turn order."""
        queue = self.waiting.pop(tenant)
        row = queue.popleft()
        if queue:
            self.waiting[tenant] = queue
        self._served_last = tenant
        return row

    def _admit(self, joining: list[Row]) -> None:
        self._warm_apart_if_cheaper(joining)
        pending = start_prefill(self.backbone, joining, self._prompt_kv)
        # Only a group with an input longer than a chunk is chunked: a group of short inputs costs no more
        # in one piece than the prefill_tokens budget lets it, and cut into chunks of a few columns each it
        # would pay a whole pass over the weights per chunk (25 % of the throughput of many short
        # requests, docs/benchmarks.md). Beside a chunked prefill, newcomers hold at most a chunk's tokens
        # (_may_join) and go in one piece: one prefill is chunked at a time.
        chunk = self.prefill_chunk_tokens
        if chunk is None or pending.columns <= chunk or self.prefilling is not None:
            logits = pending.run(self.backbone)
            self._keep_inline_prompts(pending)
            self._join(pending.batch(), logits)
        else:
            self.prefilling = pending
            self._continue_prefill()

    def _continue_prefill(self) -> None:
        """The prefilling group's next chunk; the group joins the running rows after its last."""
        pending, self.prefilling = self.prefilling, None  # a chunk that fails fails its rows alone
        logits = pending.run(self.backbone, self._chunk_columns(len(pending.rows)))
        if logits is None:
            self.prefilling = pending
        else:
            self._keep_inline_prompts(pending)
            self._join(pending.batch(), logits)

    def _chunk_columns(self, rows: int) -> int | None:
        """Input columns per chunk for a group of ``rows`` rows: a chunk runs about prefill_chunk_tokens."""
        return None if self.prefill_chunk_tokens is None else max(1, self.prefill_chunk_tokens // rows)

    def _join(self, batch: DecodeBatch, logits: torch.Tensor) -> None:
        batch = self._take_tokens(batch, logits)
        if batch is not None:
            self.running = batch if self.running is None else DecodeBatch.concatenate(self.running, batch)

    def _advance(self, running: DecodeBatch) -> None:
        self.running = self._take_tokens(running, decode_step(self.backbone, running))

    def _take_tokens(self, batch: DecodeBatch, logits: torch.Tensor) -> DecodeBatch | None:
        chosen = choose_tokens(logits, batch.rows)
        tokenizer, eos = self.backbone.tokenizer, self.backbone.eos_token_id
        keep = []
        for i, (row, token) in enumerate(zip(batch.rows, chosen, strict=True)):
            if token is None:
                row.error = PromptCorrupt(UNDECODABLE)
            elif not row.cancelled:
                row.advance(tokenizer, token, eos)
            if not self._notify(row):
                keep.append(i)
        tokens = [eos if token is None else token for token in chosen]  # a failed row leaves the batch below
        batch.next_tokens = torch.tensor(tokens, dtype=torch.long, device=batch.next_tokens.device)
        return batch if len(keep) == len(batch) else batch.filter(keep)

    def _notify(self, row: Row) -> bool:
        """Tell the row's listener what changed; True when that was the row's last word."""
        over = row.done or row.error is not None  # read once: cancel may land from any thread
        delta = row.stream_delta()
        listener = self._listeners.pop(id(row), None) if over else self._listeners.get(id(row))
        if listener is None:  # already told it was over (a step failed after its last token)
            return True
        if delta or over:
            listener(row, delta, over)
        return over

    def _guarded(self, rows: list[Row], work: Callable[[], None]) -> None:
        """A failing step fails the rows it touched, not the engine: the others keep being served."""
        try:
            with torch.inference_mode():
                work()
        except Exception as error:
            log.exception("engine step failed for %d rows", len(rows))
            failed = {id(s) for s in rows}
            for row in rows:
                row.error = error
                self._notify(row)
            if self.running is not None:
                keep = [i for i, s in enumerate(self.running.rows) if id(s) not in failed]
                self.running = self.running.filter(keep)

    def _prompt_kv(self, request: GenerationRequest) -> PromptKV | InlinePrompt | None:
        """The row's prompt as cached keys and values, or, for a prompt-tuned one no cache holds, its
        vectors to run inline in the prefill (cheaper than a pass of its own: docs/benchmarks.md)."""
        if request.prompt is None:
            return None
        cache, key, prompt = self.prompt_kv_cache, request.prompt_key, request.prompt
        keyed = cache is not None and key is not None
        if is_prefix(prompt):  # already keys and values: only moved to the backbone's device and dtype
            return cache.get(key, prompt) if keyed else compute_prompt_kv(self.backbone, prompt)
        found = cache.lookup(key) if keyed else None
        return found if found is not None else InlinePrompt(prompt)

    def _warm_apart_if_cheaper(self, joining: list[Row]) -> None:
        """Where a group's cold prompt-tuned prompts get their keys and values. Inline (the default, in
        _prompt_kv) they cost nothing but their columns, unless they make the group wider: then every row
        of the group runs the extra columns. Apart, they cost their own positions and one more pass over
        the weights (PASS_COLUMNS). The cheaper is chosen, counted in columns run."""
        cache = self.prompt_kv_cache
        if cache is None:
            return
        cold = {
            r.request.prompt_key: r.request.prompt
            for r in joining
            if r.request.prompt is not None
            and r.request.prompt_key is not None
            and not is_prefix(r.request.prompt)
            and not cache.holds(r.request.prompt_key)
        }
        if not cold:
            return
        plain = max(len(r.request.context) for r in joining)
        widest = max(
            len(r.request.context) + (len(r.request.prompt) if r.request.prompt_key in cold else 0)
            for r in joining
        )
        inline = len(joining) * (widest - plain)
        apart = sum(len(prompt) for prompt in cold.values()) + PASS_COLUMNS
        if inline > apart:
            cache.warm(list(cold.items()))

    def _keep_inline_prompts(self, pending: Prefill) -> None:
        """Keep the keys and values the group's inline prompts left, each once. Their load time is the
        prefill's, shared by its rows in proportion to their columns: an estimate, as they ran together."""
        if self.prompt_kv_cache is None or not pending.inline:
            return
        seconds = time.perf_counter() - pending.started
        columns = int(pending.mask[:, pending.prompt_columns :].sum())
        for i, kv in pending.inline_prompt_kvs().items():
            key = pending.rows[i].request.prompt_key
            if key is not None:
                self.prompt_kv_cache.keep(key, kv, seconds * kv.length / max(1, columns))


def batch_tokens(request: GenerationRequest) -> int:
    """The cache positions a row may come to hold: its prompt, its input and every token it may generate."""
    return request.virtual_tokens + len(request.context) + request.max_new_tokens


def generate_all(
    backbone: Backbone,
    requests: list[GenerationRequest],
    *,
    max_batch_rows: int = 64,
    prefill_chunk_tokens: int | None = None,
) -> list[Row]:
    """Run ``requests`` to completion in this thread, through the same scheduler the engine uses, with a
    prompt cache of the call's own: rows that share a prompt (an evaluation's batch, a job's hold-out)
    have its keys and values computed once."""
    scheduler = Scheduler(
        backbone,
        max_batch_rows=max_batch_rows,
        prompt_kv_cache=PromptKVCache(backbone, CALL_PROMPT_CACHE_BYTES),
        prefill_chunk_tokens=prefill_chunk_tokens,
    )
    rows = [Row(request=r) for r in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    while not scheduler.idle:
        scheduler.step()
    for row in rows:
        if row.error is not None:
            raise row.error
    return rows


class Call(Future):
    """A piece of work run on the engine thread between decoder steps. ``abandon()`` (the caller went away)
    drops it before its next chunk."""

    def __init__(self, work: Callable[[Backbone], object]):
        super().__init__()
        self.work = work
        self.steps: Generator | None = None  # the work's chunks, once it has started
        self.abandoned = False

    def abandon(self) -> None:
        self.abandoned = True

    def turn(self, backbone: Backbone) -> bool:
        """Run the work's next chunk (all of it, if it is not a generator); True once it is over."""
        if self.abandoned:
            if self.steps is not None:
                self.steps.close()
            self.set_exception(Abandoned("the caller went away"))
            return True
        try:
            with torch.inference_mode():
                if self.steps is None:
                    if not self.set_running_or_notify_cancel():
                        return True
                    started = self.work(backbone)
                    if not isinstance(started, Generator):
                        self.set_result(started)
                        return True
                    self.steps = started
                next(self.steps)
        except StopIteration as finished:
            self.set_result(finished.value)
            return True
        except BaseException as error:  # handed to the caller, who maps it to a response
            self.set_exception(error)
            return True
        return False


class Abandoned(Exception):
    """A call dropped because its caller went away."""


class Engine:
    """The scheduler on its own thread, with a bounded queue in front and calls (classification) taking
    turns with its steps, so nothing else ever touches the model concurrently. ``max_tenant_rows`` bounds
    the rows one tenant may hold at once (None: only the global bound), so a flood from one leaves room for
    the others."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_rows: int,
        max_queued_rows: int,
        prompt_kv_cache_bytes: int,
        max_tenant_rows: int | None = None,
        admit_every_steps: int = 1,
        prefill_tokens: int | None = None,
        max_batch_tokens: int | None = None,
        observer: Observer | None = None,
        prefill_chunk_tokens: int | None = None,
    ):
        self.backbone = backbone
        self.max_batch_rows = max_batch_rows
        self.max_queued_rows = max_queued_rows
        self.max_tenant_rows = max_tenant_rows
        self.prompt_kv_cache = PromptKVCache(backbone, prompt_kv_cache_bytes, observer)
        self.scheduler = Scheduler(
            backbone,
            max_batch_rows=max_batch_rows,
            prompt_kv_cache=self.prompt_kv_cache,
            admit_every_steps=admit_every_steps,
            prefill_tokens=prefill_tokens,
            max_batch_tokens=max_batch_tokens,
            observer=observer,
            prefill_chunk_tokens=prefill_chunk_tokens,
        )
        self._cv = threading.Condition()
        self._incoming: deque[tuple[Row, Listener]] = deque()
        self._calls: deque[Call] = deque()  # in turn order: the front one runs its next chunk next
        # Seconds of engine time the decoder steps are owed: a chunk adds its length, a step takes its own.
        # Chunks wait while steps are owed time, so each kind gets half the engine when both have work.
        self._owed_to_steps = 0.0
        self._outstanding = 0  # rows accepted and not finished, calls counted by their rows
        self._tenant_rows: dict[Hashable | None, int] = {}  # the same, per tenant; no entry at zero
        self._stopping = False
        self._evicted = 0  # prompt keys and values dropped since memory was last handed back
        self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)

    @property
    def outstanding_rows(self) -> int:
        return self._outstanding

    def start(self) -> Engine:
        share_arenas()  # before the request threads exist (app/ml/memory.py)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what was accepted (up to ``timeout``), then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def submit(self, requests: list[GenerationRequest], listener: Listener) -> list[Row]:
        """Queue the requests as rows; Overloaded at once when the queue, or the tenant's share of it, has
        no room for all of them. All rows of one submit are served for one tenant: the first request's."""
        rows = [Row(request=r) for r in requests]
        tenant = requests[0].tenant if requests else None

        def releasing(row: Row, delta: str, over: bool) -> None:
            if over:
                self._release(1, tenant)
            listener(row, delta, over)

        with self._cv:
            self._admit(len(rows), tenant)
            self._incoming.extend((s, releasing) for s in rows)
            self._cv.notify()
        return rows

    def call(self, work: Callable[[Backbone], object], *, rows: int, tenant: Hashable | None = None) -> Call:
        """Run ``work(backbone)`` on the engine thread. A generator function runs one chunk (up to its next
        ``yield``) per turn, the calls taking turns between decoder steps; its return value is the result.
        ``rows`` count against the queue and ``tenant``'s share of it until the call is over."""
        call = Call(work)
        with self._cv:
            self._admit(rows, tenant)
            self._calls.append(call)
            self._cv.notify()
        call.add_done_callback(lambda _: self._release(rows, tenant))
        return call

    def _admit(self, rows: int, tenant: Hashable | None) -> None:
        if self._stopping:
            raise Unavailable("The server is shutting down.", code="shutting_down", retry_after_s=5)
        held = self._tenant_rows.get(tenant, 0)
        if self.max_tenant_rows is not None and held + rows > self.max_tenant_rows:
            raise Overloaded(
                f"Your requests already hold {held} of the {self.max_tenant_rows} inference rows one caller "
                f"may hold ({rows} asked); retry shortly.",
                retry_after_s=1,
            )
        capacity = self.max_batch_rows + self.max_queued_rows
        if self._outstanding + rows > capacity:
            raise Overloaded(
                f"The inference queue is full ({rows} rows asked); retry shortly.",
                retry_after_s=1,
            )
        self._outstanding += rows
        if rows:
            self._tenant_rows[tenant] = held + rows

    def _release(self, rows: int, tenant: Hashable | None) -> None:
        with self._cv:
            self._outstanding -= rows
            if rows:
                held = self._tenant_rows.pop(tenant) - rows
                if held:
                    self._tenant_rows[tenant] = held

    def _loop(self) -> None:
        """Each turn: a chunk of the call at the front (which then goes to the back), or a scheduler step."""
        while True:
            with self._cv:
                while not (self._incoming or self._calls or self._stopping) and self.scheduler.idle:
                    self._cv.wait()
                while self._incoming:
                    self.scheduler.add(*self._incoming.popleft())
                if self.scheduler.idle:
                    self._owed_to_steps = 0.0  # nothing to owe it to
                chunk_next = bool(self._calls) and self._owed_to_steps <= 0
                call = self._calls.popleft() if chunk_next else None
                if self._stopping and not self._calls and call is None and self.scheduler.idle:
                    return
            started = time.perf_counter()
            if call is not None:
                over = call.turn(self.backbone)
                self._owed_to_steps += time.perf_counter() - started
                if not over:
                    with self._cv:
                        self._calls.append(call)
            else:
                self.scheduler.step()
                self._owed_to_steps = max(0.0, self._owed_to_steps - (time.perf_counter() - started))
            self._release_evicted_memory()

    def _release_evicted_memory(self) -> None:
        """Once the prompt cache has evicted RELEASE_AFTER_EVICTED_BYTES, the freed pages go back to the
        system (app/ml/memory.py), between two steps, idle or under load: a steady load may never leave the
        engine idle, and a trim costs a few milliseconds of its time."""
        self._evicted += self.prompt_kv_cache.take_evicted_bytes()
        if self._evicted >= RELEASE_AFTER_EVICTED_BYTES:
            self._evicted = 0
            release_freed_memory()
