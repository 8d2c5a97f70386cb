"""The rule that refuses to publish a prompt the bare template beats: a paired test, not two means."""

from __future__ import annotations

from math import comb

import pytest

from app.contract.kinds import EvalMetric
from app.ml.versus_bare import REFUSE_BELOW_P, compare


def _rows(both_right: int, prompt_only: int, bare_only: int, neither: int) -> tuple[list, list]:
    tuned = [1.0] * both_right + [1.0] * prompt_only + [0.0] * bare_only + [0.0] * neither
    bare = [1.0] * both_right + [0.0] * prompt_only + [1.0] * bare_only + [0.0] * neither
    return tuned, bare


def test_one_row_of_forty_is_noise_and_the_prompt_is_published():
    # 0.800 against 0.825 on 40 rows: what refused the README's quick start under the old rule.
    tuned, bare = _rows(30, 2, 3, 5)
    verdict = compare(tuned, bare, EvalMetric.ACCURACY)
    assert sum(tuned) / 40 == 0.800 and sum(bare) / 40 == 0.825
    assert (verdict.prompt_better, verdict.bare_better, verdict.rows) == (2, 3, 40)
    assert verdict.p_value == pytest.approx(0.5) and not verdict.worse


def test_a_clear_lead_of_the_bare_template_refuses_and_says_how_sure():
    tuned, bare = _rows(25, 2, 9, 4)
    verdict = compare(tuned, bare, EvalMetric.ACCURACY)
    # The exact one-sided sign test: P(X >= 9) for X ~ Binomial(11, 1/2).
    assert verdict.p_value == pytest.approx(sum(comb(11, k) for k in (9, 10, 11)) / 2**11)
    assert verdict.p_value < REFUSE_BELOW_P and verdict.worse
    assert "scored better on 9 and the prompt on 2" in verdict.reason()
    assert "0.0327" in verdict.reason()


@pytest.mark.parametrize("differing", [1, 3, 9, 39])
def test_a_lead_of_one_row_is_never_refused_however_many_rows_differ(differing):
    bare_only = differing // 2 + 1
    tuned, bare = _rows(0, differing - bare_only, bare_only, 40 - differing)
    assert not compare(tuned, bare, EvalMetric.ACCURACY).worse


def test_what_refused_nothing_at_005_is_refused_now():
    """A 20-row hold-out of an overshooting job: 0.45 against 0.75, the bare template right on 11 rows
    the prompt got wrong and the prompt on 5; on the test split it was 0.548 against 0.742."""
    tuned, bare = _rows(4, 5, 11, 0)
    verdict = compare(tuned, bare, EvalMetric.ACCURACY)
    assert verdict.p_value == pytest.approx(0.105, abs=1e-3) and verdict.worse


def test_a_lead_of_the_prompt_is_never_worse():
    tuned, bare = _rows(20, 15, 0, 5)
    verdict = compare(tuned, bare, EvalMetric.ACCURACY)
    assert verdict.p_value == 1.0 and not verdict.worse


def test_the_loss_is_better_when_lower():
    tuned, bare = [0.5] * 24, [0.9] * 24
    assert not compare(tuned, bare, EvalMetric.LOSS).worse
    assert compare(bare, tuned, EvalMetric.LOSS).worse


def test_identical_rows_give_no_verdict_against_the_prompt():
    verdict = compare([0.3, 0.7], [0.3, 0.7], EvalMetric.ROUGE_L)
    assert verdict.p_value == 1.0 and verdict.prompt_better == verdict.bare_better == 0 and not verdict.worse


def test_the_scores_must_be_of_the_same_rows():
    with pytest.raises(ValueError):
        compare([1.0], [1.0, 0.0], EvalMetric.ACCURACY)


def test_a_hold_out_under_twenty_rows_never_refuses_and_says_why():
    tuned, bare = _rows(0, 0, 10, 9)  # the bare template right on 10 of 19 rows, the prompt on none
    verdict = compare(tuned, bare, EvalMetric.ACCURACY)
    assert verdict.p_value < 0.001 and not verdict.worse
    assert "19 rows is too small to tell" in verdict.reason()
