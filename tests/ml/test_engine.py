"""The engine: rows of many tasks joining and leaving one batch must compute exactly what each would alone."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest
import torch

from app.errors import Overloaded, PromptCorrupt
from app.ml.engine import Abandoned, Engine, Scheduler, batch_tokens, generate_all
from app.ml.inference import classify, classify_steps, generate_reference, generation_requests
from app.ml.prefix import init_prefix
from app.ml.prompt_kv import PromptKVCache, compute_prompt_kv, compute_prompt_kvs
from app.ml.row import Generation, Row
from tests.ml.rows import input_text, random_prompt


class _Collector:
    """A listener that records every update of every row, and signals when all rows are over."""

    def __init__(self, rows: int):
        self.deltas: dict[int, list[str]] = {}
        self.finished: dict[int, Generation] = {}
        self.errors: dict[int, Exception] = {}
        self.rows = rows
        self.all_over = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, sequence: Row, delta: str, over: bool) -> None:
        with self._lock:
            self.deltas.setdefault(id(sequence), []).append(delta)
            if over:
                if sequence.error is not None:
                    self.errors[id(sequence)] = sequence.error
                else:
                    self.finished[id(sequence)] = sequence.result()
                if len(self.finished) + len(self.errors) == self.rows:
                    self.all_over.set()


@pytest.fixture
def engine(tiny_backbone):
    engine = Engine(
        tiny_backbone, max_batch_rows=5, max_queued_rows=64, prompt_kv_cache_bytes=1 << 20
    ).start()
    yield engine
    engine.stop()


def test_sixteen_tasks_joining_a_running_batch_match_the_uncached_reference(tiny_backbone, engine):
    """16 tasks, 5 rows at a time: rows finish at different steps, and waiting rows take their places."""
    prompts = [None if i % 7 == 3 else random_prompt(2 + i % 6, seed=i) for i in range(16)]
    texts = [input_text(i) for i in range(16)]
    lengths = [3 + (i * 5) % 11 for i in range(16)]  # different lengths, so rows leave one by one
    requests = [
        generation_requests(
            tiny_backbone, prompts=[p], texts=[t], max_new_tokens=n, prompt_keys=[None if p is None else i]
        )[0]
        for i, (p, t, n) in enumerate(zip(prompts, texts, lengths, strict=True))
    ]
    collector = _Collector(16)
    sequences = engine.submit(requests[:8], collector)
    sequences += engine.submit(requests[8:], collector)  # while the first ones are decoding
    assert collector.all_over.wait(120)
    for sequence, prompt, text, n in zip(sequences, prompts, texts, lengths, strict=True):
        expected = generate_reference(tiny_backbone, prompt=prompt, text=text, max_new_tokens=n)
        assert collector.finished[id(sequence)].token_ids == expected
    assert engine.outstanding_rows == 0


def test_streamed_pieces_add_up_to_the_text_and_never_contain_the_stop_string(tiny_backbone, engine):
    free = generate_reference(tiny_backbone, prompt=None, text="the plot", max_new_tokens=10)
    full = tiny_backbone.tokenizer.decode(free)
    stop = full[4:6]
    assert stop.strip(), "the fixture model should produce visible text"
    requests = generation_requests(
        tiny_backbone,
        prompts=[None, random_prompt(4, 1)],
        texts=["the plot", "fun"],
        max_new_tokens=10,
        stop=[stop],
    )
    collector = _Collector(2)
    first, second = engine.submit(requests, collector)
    assert collector.all_over.wait(60)
    for sequence in (first, second):
        result = collector.finished[id(sequence)]
        assert "".join(collector.deltas[id(sequence)]) == result.text
        assert stop not in result.text
    assert collector.finished[id(first)].finish_reason == "stop"
    assert full.startswith(collector.finished[id(first)].text)


def decoder_passes(backbone, run: Callable[[], object]) -> int:
    """How many times ``run`` ran the backbone's decoder."""
    passes = []
    hook = backbone.model.get_decoder().register_forward_hook(lambda *_: passes.append(1))
    try:
        run()
    finally:
        hook.remove()
    return len(passes)


def test_a_prompt_shared_by_many_rows_has_its_keys_and_values_computed_once(tiny_backbone):
    """Six rows of one cold prompt: its keys and values come out of the rows' own prefill (one decoder
    pass, no pass of their own), are kept once, and equal those of the prompt run alone."""
    prompt = random_prompt(6, 3)
    cache = PromptKVCache(tiny_backbone, max_bytes=1 << 20)
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=cache)
    requests = generation_requests(
        tiny_backbone,
        prompts=[prompt] * 6,
        texts=[input_text(i) for i in range(6)],
        max_new_tokens=4,
        prompt_keys=["t"] * 6,
    )
    rows = [Row(request=request) for request in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    assert decoder_passes(tiny_backbone, scheduler.step) == 1  # the admission: one prefill
    while not scheduler.idle:
        scheduler.step()
    assert len(cache._entries) == 1
    kv = cache.lookup("t")
    direct = compute_prompt_kv(tiny_backbone, prompt)
    assert kv.length == 6
    assert torch.allclose(kv.keys, direct.keys, atol=1e-5) and torch.allclose(
        kv.values, direct.values, atol=1e-5
    )
    for i, row in enumerate(rows):
        expected = generate_reference(tiny_backbone, prompt=prompt, text=input_text(i), max_new_tokens=4)
        assert row.result().token_ids == expected


def test_the_prompt_kv_cache_stays_within_its_byte_bound(tiny_backbone):
    one = compute_prompt_kv(tiny_backbone, random_prompt(8, 0)).nbytes
    cache = PromptKVCache(tiny_backbone, max_bytes=3 * one)
    for key in range(10):
        cache.get(key, random_prompt(8, key))
    assert cache.nbytes <= 3 * one and list(cache._entries) == [7, 8, 9]


def test_a_cancelled_row_stops_and_frees_its_place(tiny_backbone, engine):
    requests = generation_requests(
        tiny_backbone, prompts=[None, None], texts=["the film", "fun"], max_new_tokens=400
    )
    collector = _Collector(2)
    gate = threading.Event()
    busy = engine.call(lambda _: gate.wait(30), rows=0)
    cancelled, kept = engine.submit(requests, collector)
    cancelled.cancelled = True  # before it ever ran: it never joins the batch
    gate.set()
    busy.result(timeout=30)
    kept.cancelled = True  # while it runs
    assert collector.all_over.wait(60)
    assert len(collector.finished[id(cancelled)].token_ids) == 0
    assert len(collector.finished[id(kept)].token_ids) < 400
    assert engine.outstanding_rows == 0


def test_a_full_queue_refuses_at_once_and_counts_rows(tiny_backbone):
    engine = Engine(tiny_backbone, max_batch_rows=2, max_queued_rows=1, prompt_kv_cache_bytes=1 << 20)
    requests = generation_requests(tiny_backbone, prompts=[None] * 2, texts=["a", "b"], max_new_tokens=2)
    engine.submit(requests, lambda *_: None)  # not started: nothing drains the queue
    with pytest.raises(Overloaded) as refused:
        engine.submit(requests, lambda *_: None)
    assert refused.value.retry_after_s == 1 and "(2 rows asked)" in refused.value.message
    assert engine.outstanding_rows == 2  # the refused rows took no place
    # Other tenants' load is not the caller's business: the message gives no count of the rows taken.
    assert "taken" not in refused.value.message


def test_a_tenant_with_one_row_is_not_queued_behind_another_tenants_flood(tiny_backbone):
    scheduler = Scheduler(tiny_backbone, max_batch_rows=2, prompt_kv_cache=None)
    flood = generation_requests(
        tiny_backbone,
        prompts=[None] * 6,
        texts=[input_text(i) for i in range(6)],
        max_new_tokens=4,
        tenant="b",
    )
    (lone,) = generation_requests(tiny_backbone, prompts=[None], texts=["fun"], max_new_tokens=4, tenant="a")
    for request in flood:
        scheduler.add(Row(request=request), lambda *_: None)
    mine = Row(request=lone)
    scheduler.add(mine, lambda *_: None)
    scheduler.step()  # one admission: first in, first served would take two of b's rows
    assert scheduler.running is not None and mine in scheduler.running.rows
    assert [s.request for s in scheduler.running.rows] == [flood[0], lone]


def test_free_places_go_round_robin_between_tenants_in_each_tenants_order(tiny_backbone):
    """One place, rows of one token: each step admits a row that finishes at once, so the order in which
    rows finish is the order in which they were served."""
    scheduler = Scheduler(tiny_backbone, max_batch_rows=1, prompt_kv_cache=None)
    served: list[str] = []

    def add(tenant: str, count: int) -> None:
        texts = [f"{tenant}{i}" for i in range(count)]
        requests = generation_requests(
            tiny_backbone, prompts=[None] * count, texts=texts, max_new_tokens=1, tenant=tenant
        )
        for text, request in zip(texts, requests, strict=True):
            scheduler.add(Row(request=request), lambda *_, t=text: served.append(t))

    add("b", 4)
    scheduler.step()
    add("a", 2)  # while b, just served, still has three rows waiting: a goes first
    while not scheduler.idle:
        scheduler.step()
    assert served == ["b0", "a0", "b1", "a1", "b2", "b3"]


def test_one_tenant_cannot_take_more_than_its_share_of_the_queue(tiny_backbone):
    engine = Engine(
        tiny_backbone, max_batch_rows=4, max_queued_rows=64, prompt_kv_cache_bytes=1 << 20, max_tenant_rows=2
    ).start()
    try:

        def rows(tenant: str, count: int):
            return generation_requests(
                tiny_backbone, prompts=[None] * count, texts=["fun"] * count, max_new_tokens=2, tenant=tenant
            )

        gate = threading.Event()
        busy = engine.call(lambda _: gate.wait(30), rows=0)  # holds the engine so no row finishes yet
        with pytest.raises(Overloaded) as refused:
            engine.submit(rows("b", 3), lambda *_: None)
        assert refused.value.retry_after_s == 1
        assert "0 of the 2 inference rows one caller may hold" in refused.value.message
        b_rows = _Collector(2)
        engine.submit(rows("b", 2), b_rows)
        with pytest.raises(Overloaded):
            engine.submit(rows("b", 1), lambda *_: None)
        a_rows = _Collector(2)
        engine.submit(rows("a", 2), a_rows)  # b's full share takes nothing from a's
        assert engine.outstanding_rows == 4
        gate.set()
        busy.result(timeout=30)
        assert b_rows.all_over.wait(60) and a_rows.all_over.wait(60)
        again = _Collector(2)
        engine.submit(rows("b", 2), again)  # b's finished rows no longer count against it
        assert again.all_over.wait(60) and len(again.finished) == 2
        assert engine.outstanding_rows == 0 and engine._tenant_rows == {}
    finally:
        engine.stop()


def test_a_failing_step_fails_its_rows_and_the_engine_keeps_serving(tiny_backbone, engine, monkeypatch):
    bad = generation_requests(tiny_backbone, prompts=[random_prompt(3, 0)], texts=["fun"], max_new_tokens=3)
    from app.ml import engine as engine_module

    real = engine_module.start_prefill

    def exploding(backbone, rows, prompt_kv):
        if any(r.request is bad[0] for r in rows):
            raise RuntimeError("boom")
        return real(backbone, rows, prompt_kv)

    monkeypatch.setattr(engine_module, "start_prefill", exploding)
    collector = _Collector(1)
    engine.submit(bad, collector)
    assert collector.all_over.wait(30)
    assert isinstance(next(iter(collector.errors.values())), RuntimeError)
    good = _Collector(1)
    (row,) = engine.submit(
        generation_requests(tiny_backbone, prompts=[None], texts=["fun"], max_new_tokens=3), good
    )
    assert good.all_over.wait(30) and len(good.finished[id(row)].token_ids) == 3
    assert engine.outstanding_rows == 0


def test_a_prompt_of_extreme_values_fails_its_own_rows_and_no_other(tiny_backbone, engine):
    """A prefix of finite but huge values (3e38) overflows the backbone's attention: its rows' scores are
    not finite, and sampling from them raised and failed every row of the step. Those rows fail alone; a
    greedy row in the same steps decodes as it would alone."""
    shape = init_prefix(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=0).shape
    extreme = torch.full(shape, 3e38)
    requests = generation_requests(
        tiny_backbone,
        prompts=[extreme, extreme, None],
        texts=["fun", "the plot", "a moving story"],
        max_new_tokens=6,
        temperature=1.0,
        seed=0,
    )
    requests[2] = dataclasses.replace(requests[2], temperature=0.0)  # another tenant's greedy row
    collector = _Collector(3)
    rows = engine.submit(requests, collector)
    assert collector.all_over.wait(60)
    for row in rows[:2]:
        error = collector.errors[id(row)]
        assert isinstance(error, PromptCorrupt) and "not finite" in error.message
    expected = generate_reference(tiny_backbone, prompt=None, text="a moving story", max_new_tokens=6)
    assert collector.finished[id(rows[2])].token_ids == expected
    assert engine.outstanding_rows == 0


def test_classification_calls_run_between_steps_and_return_their_value(engine):
    future: Future = engine.call(lambda backbone: backbone.name, rows=1)
    assert future.result(timeout=30) == "tiny" and engine.outstanding_rows == 0


def test_newcomers_join_a_running_batch_together_every_few_steps(tiny_backbone):
    """Each admission is a prefill that pauses the running rows: arrivals are grouped, but an idle engine
    takes a row at once. Rows still compute what they would alone."""
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, admit_every_steps=3)
    texts = [input_text(i) for i in range(4)]
    requests = generation_requests(tiny_backbone, prompts=[None] * 4, texts=texts, max_new_tokens=12)
    rows = [Row(request=r) for r in requests]
    scheduler.add(rows[0], lambda *_: None)
    scheduler.step()
    assert len(scheduler.running) == 1
    for row in rows[1:]:  # three arrivals, one per decoder step: none joins yet
        scheduler.add(row, lambda *_: None)
        scheduler.step()
        assert len(scheduler.running) == 1
    scheduler.step()  # three steps since the last admission: all three join in one prefill
    assert len(scheduler.running) == 4
    while not scheduler.idle:
        scheduler.step()
    for row, text in zip(rows, texts, strict=True):
        expected = generate_reference(tiny_backbone, prompt=None, text=text, max_new_tokens=12)
        assert row.result().token_ids == expected


def test_the_idle_engine_hands_back_memory_its_prompt_cache_freed(tiny_backbone, monkeypatch):
    released = threading.Event()
    monkeypatch.setattr("app.ml.engine.release_freed_memory", released.set)
    one = compute_prompt_kv(tiny_backbone, random_prompt(4, 0)).nbytes
    monkeypatch.setattr("app.ml.engine.RELEASE_AFTER_EVICTED_BYTES", 3 * one)
    engine = Engine(
        tiny_backbone, max_batch_rows=4, max_queued_rows=64, prompt_kv_cache_bytes=2 * one
    ).start()
    try:
        for key in range(6):  # six prompts through a cache of two: four evicted
            collector = _Collector(1)
            request = generation_requests(
                tiny_backbone,
                prompts=[random_prompt(4, key)],
                texts=["fine"],
                max_new_tokens=1,
                prompt_keys=[key],
            )
            engine.submit(request, collector)
            assert collector.all_over.wait(30)
            if key == 2:
                assert not released.is_set()  # one eviction so far: under the threshold
        assert released.wait(5)
    finally:
        engine.stop()


def test_freed_memory_can_be_handed_back_here():
    from app.ml.memory import release_freed_memory

    assert release_freed_memory()  # glibc, as on every machine this runs on


def _scoring(texts: list[str], labels: list[str], chunk_tokens: int):
    """A classification call as serving makes it: chunks of at most ``chunk_tokens``."""
    return lambda backbone: classify_steps(
        backbone, prompts=[None] * len(texts), texts=texts, labels=labels, chunk_tokens=chunk_tokens
    )


def test_a_large_classification_takes_turns_with_another_tenants_generation(tiny_backbone):
    """One chunk of the large request, then a step of the others: a two-token generation of another tenant
    is done long before the classification, which before ran whole, ahead of every step."""
    engine = Engine(
        tiny_backbone, max_batch_rows=4, max_queued_rows=64, prompt_kv_cache_bytes=1 << 20
    ).start()
    try:
        texts = [input_text(i) for i in range(16)]
        labels = [f"label {i} of this long list" for i in range(12)]
        large = engine.call(_scoring(texts, labels, 16), rows=16, tenant="a")
        collector = _Collector(1)
        request = generation_requests(tiny_backbone, prompts=[None], texts=["fun"], max_new_tokens=2)
        engine.submit([dataclasses.replace(request[0], tenant="b")], collector)
        assert collector.all_over.wait(60)
        assert not large.done(), "the generation waited for the whole classification"
        scores = large.result(timeout=120)
        assert len(scores) == 16 and all(set(row) == set(labels) for row in scores)
        alone = classify(tiny_backbone, prompts=[None] * 16, texts=texts, labels=labels)
        for row, expected in zip(scores, alone, strict=True):
            assert row == pytest.approx(expected, abs=1e-5)
    finally:
        engine.stop()


def test_an_abandoned_call_stops_before_its_next_chunk_and_frees_its_rows(tiny_backbone, engine):
    chunks_run = []

    def work(_):
        for chunk in range(1000):
            chunks_run.append(chunk)
            time.sleep(0.005)
            yield
        return "finished"

    call = engine.call(work, rows=3)
    while len(chunks_run) < 3:
        time.sleep(0.005)
    call.abandon()
    with pytest.raises(Abandoned):
        call.result(timeout=10)
    ran = len(chunks_run)
    time.sleep(0.05)
    assert len(chunks_run) == ran < 1000 and engine.outstanding_rows == 0


def test_an_admission_prefills_at_most_its_token_budget_unless_one_row_is_longer(tiny_backbone):
    texts = ["a b c d e", "f g h i j", "k l m n o", "the story of a long film " * 8]
    requests = generation_requests(tiny_backbone, prompts=[None] * 4, texts=texts, max_new_tokens=12)
    lengths = [len(r.context) for r in requests]
    budget = lengths[0] + lengths[1]  # room for two rows, not three; the fourth is longer on its own
    assert lengths[3] > budget
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, prefill_tokens=budget)
    rows = [Row(request=r) for r in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    admitted = []
    for _ in range(5):  # admissions every other step: a decoder step comes between two of them
        scheduler.step()
        admitted.append(len(scheduler.running))
    # The third would pass the budget: it waits for the next prefill; the long one has one of its own.
    assert admitted == [2, 2, 3, 3, 4]
    while not scheduler.idle:
        scheduler.step()
    for row, text in zip(rows, texts, strict=True):  # the long row ran alone, and everything still matches
        expected = generate_reference(tiny_backbone, prompt=None, text=text, max_new_tokens=12)
        assert row.result().token_ids == expected


def test_a_tenant_with_no_row_running_joins_at_once_and_alone(tiny_backbone):
    """Another tenant's rows join every few steps; a newcomer tenant's row does not wait for that cadence,
    and its prefill holds only its own rows."""
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, admit_every_steps=4)
    busy = generation_requests(tiny_backbone, prompts=[None] * 3, texts=["a", "b", "c"], max_new_tokens=20)
    busy = [dataclasses.replace(r, tenant="busy") for r in busy]
    scheduler.add(Row(request=busy[0]), lambda *_: None)
    scheduler.step()  # busy's first row runs
    scheduler.add(Row(request=busy[1]), lambda *_: None)  # waits for the cadence
    newcomer = generation_requests(tiny_backbone, prompts=[None], texts=["fun"], max_new_tokens=2)[0]
    row = Row(request=dataclasses.replace(newcomer, tenant="quiet"))
    scheduler.add(row, lambda *_: None)
    scheduler.step()
    assert [s.request.tenant for s in scheduler.running.rows] == ["busy", "quiet"]
    assert [s.request.tenant for queue in scheduler.waiting.values() for s in queue] == ["busy"]


def test_the_batch_holds_at_most_its_token_budget_and_keeps_a_quarter_for_newcomers(tiny_backbone):
    """Keys and values grow with every running row's positions: the batch admits rows while their
    prompt, input and new tokens fit the budget. One tenant's rows may fill three quarters of it; the
    last quarter is for a tenant with no row running, whose first request is not shut out."""
    texts = [input_text(i) for i in range(6)]
    heavy = generation_requests(tiny_backbone, prompts=[None] * 6, texts=texts, max_new_tokens=40)
    heavy = [dataclasses.replace(r, tenant="heavy") for r in heavy]
    budget = 4 * max(batch_tokens(r) for r in heavy)  # three quarters: three of heavy's rows at most
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, max_batch_tokens=budget)
    for request in heavy:
        scheduler.add(Row(request=request), lambda *_: None)
    scheduler.step()
    assert len(scheduler.running) == 3
    light = generation_requests(tiny_backbone, prompts=[None], texts=["fun"], max_new_tokens=2)[0]
    scheduler.add(Row(request=dataclasses.replace(light, tenant="light")), lambda *_: None)
    scheduler.step()  # heavy's fourth row does not fit; light's first row fits in the quarter kept for it
    assert [s.request.tenant for s in scheduler.running.rows] == ["heavy"] * 3 + ["light"]
    assert sum(batch_tokens(s.request) for s in scheduler.running.rows) <= budget


def _long_mixed_requests(backbone, count: int):
    """Inputs several chunks long, of different lengths, for a prompt, a prefix and the bare backbone."""
    prompts = [
        [
            random_prompt(3, seed=i),
            init_prefix(backbone, num_virtual_tokens=4, strategy="random", seed=i),
            None,
        ][i % 3]
        for i in range(count)
    ]
    texts = [" ".join(input_text(i + j) for j in range(3 + i % 4)) for i in range(count)]
    return prompts, texts, generation_requests(backbone, prompts=prompts, texts=texts, max_new_tokens=6)


def test_a_chunked_prefill_gives_the_unchunked_greedy_output_for_both_methods_in_one_batch(tiny_backbone):
    prompts, texts, requests = _long_mixed_requests(tiny_backbone, 6)
    chunk = 8
    assert min(len(r.context) for r in requests) > 3 * chunk  # every input is several chunks long
    whole = generate_all(tiny_backbone, requests)
    chunked = generate_all(tiny_backbone, requests, prefill_chunk_tokens=chunk)
    assert [r.result().token_ids for r in chunked] == [r.result().token_ids for r in whole]
    for row, prompt, text in zip(chunked, prompts, texts, strict=True):
        expected = generate_reference(tiny_backbone, prompt=prompt, text=text, max_new_tokens=6)
        assert row.result().token_ids == expected


def test_running_rows_and_short_newcomers_take_turns_with_the_chunks_of_a_long_prefill(tiny_backbone):
    """While another tenant's long input is prefilled chunk by chunk, the running rows get a token after a
    chunk and a short newcomer joins before the long prefill is over; every output stays exact."""
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, prefill_chunk_tokens=8)
    short = generation_requests(
        tiny_backbone, prompts=[None] * 2, texts=["fun", "a dull plot"], max_new_tokens=30
    )
    running, newcomer = (Row(request=dataclasses.replace(r, tenant="small")) for r in short)
    long_text = "the story of a long film with a great cast " * 6
    long_request = generation_requests(tiny_backbone, prompts=[None], texts=[long_text], max_new_tokens=4)[0]
    long_row = Row(request=dataclasses.replace(long_request, tenant="large"))
    scheduler.add(running, lambda *_: None)
    scheduler.step()  # the small tenant's row runs
    scheduler.add(long_row, lambda *_: None)
    scheduler.step()  # the long row's first chunk
    assert scheduler.prefilling is not None and len(long_row.request.context) > 4 * 8
    tokens_before = len(running.produced)
    scheduler.step()  # the running rows are owed the chunk's time: their turn
    assert len(running.produced) == tokens_before + 1
    scheduler.add(newcomer, lambda *_: None)
    scheduler.step()
    scheduler.step()  # within two steps the newcomer joins, in one piece, while the long prefill goes on
    assert newcomer in scheduler.running.rows and scheduler.prefilling is not None
    while not scheduler.idle:
        scheduler.step()
    assert all(row.error is None for row in (running, newcomer, long_row))
    expected = generate_reference(tiny_backbone, prompt=None, text=long_text, max_new_tokens=4)
    assert long_row.result().token_ids == expected
    for row, text in ((running, "fun"), (newcomer, "a dull plot")):
        assert row.result().token_ids == generate_reference(
            tiny_backbone, prompt=None, text=text, max_new_tokens=30
        )


def test_cold_prompts_computed_together_equal_those_computed_one_by_one(tiny_backbone):
    prompts = [random_prompt(3, seed=i) for i in range(4)] + [random_prompt(5, seed=9)]
    prompts.append(init_prefix(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1))
    together = []
    passes = decoder_passes(
        tiny_backbone, lambda: together.extend(compute_prompt_kvs(tiny_backbone, prompts))
    )
    assert passes == 2  # the four of length 3 in one pass, the one of length 5 in another
    for prompt, kv in zip(prompts, together, strict=True):
        alone = compute_prompt_kv(tiny_backbone, prompt)
        assert torch.allclose(kv.keys, alone.keys, atol=1e-5) and torch.allclose(
            kv.values, alone.values, atol=1e-5
        )


def test_a_cold_prompt_that_would_widen_a_large_group_gets_a_pass_of_its_own(tiny_backbone):
    """One cold prompt among 40 rows of one length: inline it would add its 30 columns to every row (1,200
    columns), apart it costs its 30 positions and one pass. Apart it is, and every row is exact."""
    prompt = random_prompt(30, 5)
    cache = PromptKVCache(tiny_backbone, max_bytes=1 << 20)
    scheduler = Scheduler(tiny_backbone, max_batch_rows=64, prompt_kv_cache=cache)
    texts = ["a fine film with a dull plot"] * 40
    requests = generation_requests(
        tiny_backbone,
        prompts=[prompt] + [None] * 39,
        texts=texts,
        max_new_tokens=3,
        prompt_keys=["cold"] + [None] * 39,
    )
    rows = [Row(request=request) for request in requests]
    for row in rows:
        scheduler.add(row, lambda *_: None)
    # The admission: the prompt's pass, then the group's prefill.
    assert decoder_passes(tiny_backbone, scheduler.step) == 2 and cache.holds("cold")
    while not scheduler.idle:
        scheduler.step()
    for row, request in zip(rows, requests, strict=True):
        expected = generate_reference(tiny_backbone, prompt=request.prompt, text=texts[0], max_new_tokens=3)
        assert row.result().token_ids == expected


def test_newcomers_beside_a_chunked_prefill_never_displace_it(tiny_backbone):
    """Two newcomers within a chunk's tokens, but padded wider than a chunk's columns for two rows, join in
    one piece: the long prefill under way keeps its rows, and every row finishes exactly."""
    scheduler = Scheduler(tiny_backbone, max_batch_rows=8, prompt_kv_cache=None, prefill_chunk_tokens=8)
    long_text = "the story of a long film with a great cast " * 6
    texts = [long_text, "a dull plot", "fun"]
    requests = generation_requests(tiny_backbone, prompts=[None] * 3, texts=texts, max_new_tokens=4)
    long_row = Row(request=dataclasses.replace(requests[0], tenant="large"))
    # Two tenants with no row running: both join in one admission.
    short_rows = [
        Row(request=dataclasses.replace(r, tenant=f"small-{i}")) for i, r in enumerate(requests[1:])
    ]
    lengths = [len(r.request.context) for r in short_rows]
    assert sum(lengths) <= 8 and max(lengths) > 8 // 2  # within a chunk, wider than half of one
    scheduler.add(long_row, lambda *_: None)
    scheduler.step()  # the long row's first chunk
    for row in short_rows:
        scheduler.add(row, lambda *_: None)
    scheduler.step()
    assert all(row in scheduler.running.rows for row in short_rows)  # together, in one piece
    while not scheduler.idle:
        scheduler.step()
    for row, text in zip([long_row, *short_rows], texts, strict=True):
        assert row.result().token_ids == generate_reference(
            tiny_backbone, prompt=None, text=text, max_new_tokens=4
        )
