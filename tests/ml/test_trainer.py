from __future__ import annotations

import functools

import pytest
import torch

from app.contract.kinds import EvalMetric
from app.ml import layout, trainer, versus_bare
from app.ml.checkpoint import Checkpoint, checkpoint_from_bytes, checkpoint_to_bytes
from app.ml.generation_scores import generation_report
from app.ml.inference import generate, label_log_likelihoods
from app.ml.layout import context_ids, target_ids, target_log_probs
from app.ml.prefix import init_prefix
from app.ml.soft_prompt import init_prompt
from app.ml.text import render
from app.ml.trainer import (
    DECODE_MARGIN,
    ROWS_KEY,
    Example,
    TrainConfig,
    _Best,
    _encode,
    _loss,
    evaluate,
    train_prompt,
)
from app.ml.versus_bare import compare

TEMPLATE = "Review: {input}\nSentiment:"
LABELS = ["positive", "negative"]
POSITIVE = ["great", "wonderful", "fun", "good", "moving", "beautiful"]
NEGATIVE = ["dull", "boring", "bad", "tedious", "lifeless", "awful"]


def _config(**given) -> TrainConfig:
    """The trainer's settings in these tests: what a test gives, over a small, quick run's."""
    return TrainConfig(
        **{
            "steps": 10,
            "batch_size": 8,
            "learning_rate": 0.03,
            "max_grad_norm": 1.0,
            "seed": 0,
            "optimizer": "adamw",
        }
        | given
    )


def _examples() -> list[Example]:
    """The label is the input's word: trivially learnable by a prompt."""
    return [Example(f"a {w} film", "positive") for w in POSITIVE] + [
        Example(f"a {w} film", "negative") for w in NEGATIVE
    ]


def _train(
    backbone,
    steps: int = 0,
    seed: int = 0,
    should_stop=lambda: False,
    progress=None,
    *,
    config: TrainConfig | None = None,
    k: int = 8,
    validation: list[Example] | None = None,
    kind: str = "prompt",
    **extra,
):
    data = _examples()
    start = init_prompt if kind == "prompt" else init_prefix
    return train_prompt(
        backbone,
        prompt=start(backbone, num_virtual_tokens=k, strategy="random", seed=3),
        train=data,
        validation=data if validation is None else validation,
        template=TEMPLATE,
        labels=LABELS,
        config=config or _config(steps=steps, batch_size=6, learning_rate=0.1, warmup_steps=2, seed=seed),
        on_progress=(progress if progress is not None else lambda p: None),
        should_stop=should_stop,
        **extra,
    )


def test_training_lowers_the_loss_and_raises_accuracy_without_touching_the_backbone(tiny_backbone):
    before = {name: p.detach().clone() for name, p in tiny_backbone.model.state_dict().items()}
    untrained = _train(tiny_backbone, steps=0)
    seen = []
    trained = _train(tiny_backbone, steps=40, progress=seen.append)
    assert trained.steps_done == 40 and not trained.stopped
    assert [p.step for p in seen] == list(range(1, 41))
    assert seen[-1].eta_seconds == 0
    assert trained.metrics["val_loss"] < untrained.metrics["val_loss"] * 0.7
    assert trained.metrics["train_loss"] < seen[0].loss
    assert trained.metrics["val_accuracy"] >= max(0.9, untrained.metrics["val_accuracy"])
    assert trained.prompt.shape == (8, 64) and trained.prompt.dtype == torch.float32
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_same_seed_same_prompt(tiny_backbone):
    first = _train(tiny_backbone, steps=5, seed=1)
    assert torch.equal(first.prompt, _train(tiny_backbone, steps=5, seed=1).prompt)
    assert not torch.equal(first.prompt, _train(tiny_backbone, steps=5, seed=2).prompt)


def test_should_stop_ends_training_early(tiny_backbone):
    seen = []
    result = _train(tiny_backbone, steps=50, should_stop=lambda: len(seen) >= 3, progress=seen.append)
    assert result.stopped
    assert result.steps_done == 3 == len(seen)


def test_without_eos_the_loss_covers_the_label_tokens_only(tiny_backbone):
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1)
    data = _examples()
    with_eos = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=None, append_eos=True)
    without = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=None, append_eos=False)
    contexts = [context_ids(tiny_backbone, render(TEMPLATE, ex.input)) for ex in data]
    targets = [
        target_ids(tiny_backbone, render(TEMPLATE, ex.input), ex.output, with_eos=False) for ex in data
    ]
    with torch.inference_mode():
        log_probs, _ = target_log_probs(tiny_backbone, [prompt] * len(data), contexts, targets)
    assert without["val_loss"] == pytest.approx(-log_probs.mean().item(), rel=1e-5)
    assert with_eos["val_loss"] != pytest.approx(without["val_loss"], rel=1e-3)


def test_a_classification_evaluation_takes_its_loss_from_the_label_scores(tiny_backbone):
    """One pass scores the labels and gives the loss: it must equal the loss of the target tokens."""
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1)
    data = _examples()
    one_pass = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=LABELS, append_eos=False)
    loss_only = evaluate(tiny_backbone, prompt, data, template=TEMPLATE, labels=None, append_eos=False)
    assert one_pass["val_loss"] == pytest.approx(loss_only["val_loss"], rel=1e-5)
    assert one_pass["val_accuracy"] is not None


def test_the_label_loss_is_the_cross_entropy_of_the_scores_classification_predicts_from(tiny_backbone):
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1)
    data = _examples()
    encoded = _encode(tiny_backbone, data, TEMPLATE, 4, append_eos=False, labels=LABELS)
    assert [e.answer for e in encoded] == [LABELS.index(ex.output) for ex in data]
    with torch.inference_mode():
        loss = _loss(tiny_backbone, prompt, encoded)
    scores = label_log_likelihoods(
        tiny_backbone,
        prompts=[prompt] * len(data),
        texts=[render(TEMPLATE, ex.input) for ex in data],
        labels=LABELS,
    )  # [B, labels]
    answers = torch.tensor([LABELS.index(ex.output) for ex in data])
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(scores, answers).item(), rel=1e-5)


def test_labels_of_several_tokens_fall_back_to_the_token_loss(tiny_backbone):
    labels = ["quite positive indeed", "negative"]
    data = [Example("a fun film", labels[0]), Example("a dull film", labels[1])]
    encoded = _encode(tiny_backbone, data, TEMPLATE, 4, append_eos=False, labels=labels)
    assert [e.choices for e in encoded] == [None, None]
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=1)
    with torch.inference_mode():
        log_probs, _ = target_log_probs(
            tiny_backbone, [prompt] * 2, [e.context for e in encoded], [e.target for e in encoded]
        )
        assert _loss(tiny_backbone, prompt, encoded).item() == pytest.approx(-log_probs.mean().item())


def test_a_prefix_trains_too_and_its_step_runs_no_forward_pass_over_the_prompt(tiny_backbone, monkeypatch):
    before = {name: p.detach().clone() for name, p in tiny_backbone.model.state_dict().items()}
    untrained = _train(tiny_backbone, steps=0, kind="prefix")
    decoder_calls = []
    decoder = tiny_backbone.model.get_decoder()
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: decoder_calls.append(1) or original(*a, **kw))
    trained = _train(tiny_backbone, steps=40, kind="prefix")
    monkeypatch.undo()
    assert trained.prompt.shape == untrained.prompt.shape and trained.prompt.ndim == 5
    assert trained.metrics["val_loss"] < untrained.metrics["val_loss"] * 0.7
    assert trained.metrics["val_accuracy"] >= max(0.9, untrained.metrics["val_accuracy"])
    # One decoder pass per step (the packed rows on top of the prefix) plus the evaluations': a prompt's
    # step runs a second one over its k positions.
    evaluations = len(decoder_calls) - 40
    assert 0 < evaluations < 40
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_training_on_the_label_loss_learns_the_labels(tiny_backbone):
    config = _config(
        steps=40, batch_size=6, learning_rate=0.1, warmup_steps=2, append_eos=False, label_loss=True
    )
    untrained = _train(tiny_backbone, config=_config(steps=0, append_eos=False))
    trained = _train(tiny_backbone, config=config)
    assert trained.metrics["val_accuracy"] >= max(0.9, untrained.metrics["val_accuracy"])
    assert trained.metrics["val_loss"] < untrained.metrics["val_loss"]


def test_packed_rows_score_as_if_each_ran_alone(tiny_backbone, monkeypatch):
    """Rows are packed end to end; a tight pack size forces several packs and a zero-filled tail."""
    monkeypatch.setattr(layout, "PACK_ENTRIES", 40)
    data = _examples()
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=5, strategy="random", seed=2)
    prompts = [prompt if i % 2 else None for i in range(len(data))]
    contexts = [context_ids(tiny_backbone, render(TEMPLATE, ex.input)) for ex in data]
    targets = [target_ids(tiny_backbone, render(TEMPLATE, ex.input), ex.output, with_eos=True) for ex in data]
    with torch.inference_mode():
        together, row_of = target_log_probs(tiny_backbone, prompts, contexts, targets)
        for i in range(len(data)):
            alone, _ = target_log_probs(tiny_backbone, [prompts[i]], [contexts[i]], [targets[i]])
            assert together[row_of == i] == pytest.approx(alone, abs=1e-5)


def test_patience_stops_a_run_that_no_longer_improves_and_reports_zero_shot(tiny_backbone):
    data = _examples()
    # A zero learning rate never moves the prompt: no evaluation beats the first one, after step 1, and
    # two more without improvement stop the run. The start ties with step 1, so it is not the fallback.
    config = _config(steps=50, batch_size=6, learning_rate=0.0, eval_every=1, patience=2)
    result = _train(tiny_backbone, config=config, k=4)
    assert result.steps_done == 3 and not result.stopped
    metrics = result.metrics
    assert metrics["stopped_early"] and metrics["best_step"] == 1
    assert set(metrics["val_per_label"]) == set(LABELS) and 0 <= metrics["val_macro_f1"] <= 1
    bare = evaluate(tiny_backbone, None, data, template=TEMPLATE, labels=LABELS, append_eos=True)
    assert metrics["zero_shot_accuracy"] == bare["val_accuracy"]


def test_a_run_that_only_made_the_prompt_worse_keeps_the_prompt_it_started_from(tiny_backbone, monkeypatch):
    data = _examples()
    # Twelve hold-out rows tell little; a lax rule refuses the trained prompt here, so that the start,
    # which scores better, is the fallback.
    monkeypatch.setattr(trainer, "compare", functools.partial(trainer.compare, refuse_below_p=0.5))
    monkeypatch.setattr(versus_bare, "MIN_ROWS", 0)
    # Trained on every label swapped, then held to the true ones: each step makes the hold-out worse.
    swapped = [Example(ex.input, LABELS[1 - LABELS.index(ex.output)]) for ex in data]
    start = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=3)
    config = _config(steps=20, batch_size=6, learning_rate=0.3)
    result = train_prompt(
        tiny_backbone,
        prompt=start,
        train=swapped,
        validation=data,
        template=TEMPLATE,
        labels=LABELS,
        config=config,
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    started = evaluate(tiny_backbone, start, data, template=TEMPLATE, labels=LABELS)
    assert result.metrics["best_step"] == 0 and torch.equal(result.prompt, start)
    assert result.metrics["val_loss"] == pytest.approx(started["val_loss"])
    bare = evaluate(tiny_backbone, None, data, template=TEMPLATE, labels=LABELS)
    assert result.metrics["zero_shot_val_loss"] == pytest.approx(bare["val_loss"])
    # The verdict published with it is the start's, not the refused prompt's.
    rows = [
        evaluate(tiny_backbone, p, data, template=TEMPLATE, labels=LABELS, rows_by=EvalMetric.ACCURACY)
        for p in (start, None)
    ]
    expected = compare(rows[0][ROWS_KEY], rows[1][ROWS_KEY], EvalMetric.ACCURACY, refuse_below_p=0.5)
    assert result.versus_bare == expected and result.metrics["zero_shot_test"] == expected.as_metrics()


def test_a_run_above_the_bare_template_never_scores_the_prompt_it_started_from(tiny_backbone, monkeypatch):
    """Scoring the start is a whole hold-out pass (minutes of decoding on a generation task): it is done
    only when the trained prompt falls below the bare template and the start might be kept instead."""
    start = init_prompt(tiny_backbone, num_virtual_tokens=8, strategy="random", seed=3)  # as _train's
    scored = []
    real = trainer.evaluate

    def counted(backbone, prompt, *args, **kwargs):
        scored.append(prompt)
        return real(backbone, prompt, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", counted)
    result = _train(tiny_backbone, steps=40)
    assert result.metrics["val_accuracy"] > result.metrics["zero_shot_accuracy"]
    assert None in scored  # the bare template was scored
    assert not any(p is not None and torch.equal(p.cpu(), start) for p in scored)


def test_the_best_evaluated_prompt_wins_over_the_last_one():
    best = _Best(EvalMetric.ACCURACY)
    for step, accuracy, loss in ((10, 0.6, 0.9), (20, 0.8, 0.7), (30, 0.8, 0.8), (40, 0.7, 0.5)):
        best.offer(step, torch.full((2, 3), float(step)), {"val_accuracy": accuracy, "val_loss": loss})
    assert best.step == 20 and torch.equal(best.prompt, torch.full((2, 3), 20.0))
    assert best.evaluations_since_best == 2


def test_adafactor_learns_too(tiny_backbone):
    data = _examples()
    config = _config(steps=30, batch_size=6, learning_rate=0.3, warmup_steps=2, optimizer="adafactor")
    result = _train(tiny_backbone, config=config)
    untrained = evaluate(
        tiny_backbone,
        init_prompt(tiny_backbone, num_virtual_tokens=8, strategy="random", seed=3),
        data,
        template=TEMPLATE,
        labels=LABELS,
    )
    assert result.metrics["val_loss"] < untrained["val_loss"] * 0.7


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_run_resumed_from_a_stored_checkpoint_ends_exactly_like_an_unbroken_one(
    tiny_backbone, optimizer, kind
):
    data = _examples()
    config = _config(
        steps=12,
        batch_size=5,
        learning_rate=0.1,
        warmup_steps=2,
        eval_every=3,
        checkpoint_every=4,
        optimizer=optimizer,
    )

    def run(**resume):
        saved: list[Checkpoint] = []
        result = _train(
            tiny_backbone,
            config=config,
            k=4,
            validation=data[:6],
            on_checkpoint=saved.append,
            kind=kind,
            **resume,
        )
        return result, saved

    unbroken, checkpoints = run()
    assert [c.step for c in checkpoints] == [4, 8]
    stored = checkpoint_to_bytes(checkpoints[1])  # the worker died after step 8
    resumed, _ = run(resume=checkpoint_from_bytes(stored))
    assert torch.equal(resumed.prompt, unbroken.prompt)
    assert resumed.metrics == unbroken.metrics and resumed.steps_done == 12


def test_a_prompt_shared_by_the_batch_scores_as_the_plain_model_does(tiny_backbone, monkeypatch):
    """Training's path: the prompt runs once as a cache prefix for every packed row."""
    monkeypatch.setattr(layout, "PACK_ENTRIES", 30)
    data = _examples()
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=5, strategy="random", seed=2)
    contexts = [context_ids(tiny_backbone, render(TEMPLATE, ex.input)) for ex in data]
    targets = [target_ids(tiny_backbone, render(TEMPLATE, ex.input), ex.output, with_eos=True) for ex in data]
    embed = tiny_backbone.model.get_input_embeddings()
    with torch.inference_mode():
        together, row_of = target_log_probs(tiny_backbone, [prompt] * len(data), contexts, targets)
        for i, (context, target) in enumerate(zip(contexts, targets, strict=True)):
            rows = torch.cat([prompt, embed(torch.tensor(context + target))])
            logits = tiny_backbone.model(inputs_embeds=rows[None]).logits[0].log_softmax(-1)  # [n, V]
            first = len(prompt) + len(context) - 1
            direct = torch.stack([logits[first + j, t] for j, t in enumerate(target)])
            assert together[row_of == i] == pytest.approx(direct, abs=1e-4)


def test_rows_are_spread_over_as_few_packs_as_fit_and_about_equally_long():
    """Every pack is padded to the longest, so the rows go where the packs come out even."""
    sizes = [70, 50, 20, 10]  # filled in order at 80: [70], [50, 20], [10], three packs run as 3 x 70
    packs = layout.balanced_packs(sizes, 80)
    assert [[sizes[i] for i in pack] for pack in packs] == [[70, 10], [50, 20]]  # 2 x 80
    assert layout.balanced_packs([200, 10], 80) == [[0], [1]]  # an item over the capacity raises it
    assert layout.balanced_packs([], 80) == []


def _data_to_text() -> list[Example]:
    """Generation: the output restates the input's two fields."""
    names, foods = ["Alimo", "Bento", "Cora", "Dalt"], ["pasta", "sushi", "tacos"]
    return [Example(f"name[{n}] food[{f}]", f"{n} serves {f}.") for n in names for f in foods]


def test_a_generation_run_scores_its_hold_out_by_decoding_it_tuned_and_bare(tiny_backbone):
    data = _data_to_text()
    config = _config(steps=4, batch_size=4, decode_tokens=32)
    result = train_prompt(
        tiny_backbone,
        prompt=init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=3),
        train=data,
        validation=data,
        template="Data: {input}\nText:",
        labels=None,
        config=config,
        on_progress=lambda _: None,
        should_stop=lambda: False,
    )
    metrics = result.metrics
    assert metrics["eval_metric"] == "rouge_l"
    # The figures are those of the kept prompt's own greedy outputs, scored by the evaluation metrics.
    texts = [render("Data: {input}\nText:", ex.input) for ex in data]
    # Decoded up to the longest output plus the margin (under the cap of 32).
    longest = max(
        len(target_ids(tiny_backbone, t, ex.output, with_eos=False))
        for t, ex in zip(texts, data, strict=True)
    )
    assert longest + DECODE_MARGIN < 32
    options = {"max_new_tokens": longest + DECODE_MARGIN}
    outputs = generate(tiny_backbone, prompts=[result.prompt] * len(texts), texts=texts, **options)
    report = generation_report([g.text.strip() for g in outputs], [[ex.output] for ex in data])
    for name in ("exact_match", "f1", "bleu", "chrf", "rouge_l"):
        assert metrics[f"val_{name}"] == pytest.approx(report[name]), name
        assert 0 <= metrics[f"zero_shot_{name}"] <= 100


@pytest.mark.parametrize("metric", [EvalMetric.ROUGE_L, EvalMetric.LOSS])
def test_a_generation_hold_out_is_scored_row_by_row_for_the_paired_test(tiny_backbone, metric):
    data = _data_to_text()
    prompt = init_prompt(tiny_backbone, num_virtual_tokens=4, strategy="random", seed=3)
    options = {"template": "Data: {input}\nText:", "labels": None, "decode_tokens": 32, "rows_by": metric}
    metrics = evaluate(tiny_backbone, prompt, data, **options)
    rows = metrics[ROWS_KEY]
    assert len(rows) == len(data)
    if metric is EvalMetric.ROUGE_L:  # the corpus figure is the mean of the rows'
        assert sum(rows) / len(rows) == pytest.approx(metrics["val_rouge_l"])
    else:  # each row's loss per target token; weighted by the rows' token counts, the hold-out's
        texts = [render("Data: {input}\nText:", ex.input) for ex in data]
        tokens = [
            len(target_ids(tiny_backbone, t, ex.output, with_eos=True))
            for t, ex in zip(texts, data, strict=True)
        ]
        weighted = sum(r * n for r, n in zip(rows, tokens, strict=True)) / sum(tokens)
        assert weighted == pytest.approx(metrics["val_loss"], rel=1e-5)


def test_a_classification_hold_out_is_scored_right_or_wrong_row_by_row(tiny_backbone):
    data = _examples()
    metrics = evaluate(
        tiny_backbone, None, data, template=TEMPLATE, labels=LABELS, rows_by=EvalMetric.ACCURACY
    )
    assert set(metrics[ROWS_KEY]) <= {0.0, 1.0}
    assert sum(metrics[ROWS_KEY]) / len(data) == pytest.approx(metrics["val_accuracy"])


def test_the_chosen_metric_picks_the_best_prompt():
    by_bleu, by_loss = _Best(EvalMetric.BLEU), _Best(EvalMetric.LOSS)
    for best in (by_bleu, by_loss):
        best.offer(10, torch.full((1,), 10.0), {"val_bleu": 30.0, "val_loss": 2.0})
        best.offer(20, torch.full((1,), 20.0), {"val_bleu": 20.0, "val_loss": 1.0})
    assert by_bleu.step == 10 and by_loss.step == 20
