"""Whether a tuned soft prompt is worse than the bare template, beyond what its hold-out can tell.

A job must never hand a team a task that the template alone beats. But a hold-out of a few dozen rows
cannot tell 0.800 from 0.825 (one row of 40), and comparing two means refused good prompts on noise. So the
rule is a paired test over the hold-out rows: each row where the two scored differently counts for the one
that scored it better, and the exact one-sided sign test (McNemar's exact test when a row is right or
wrong) gives the chance that the bare template leads by as many rows, or more, if neither were better.
A job refuses to publish only when that chance is under ``REFUSE_BELOW_P``; the threshold was chosen by
measurement (bench/publish_rule.py, docs/benchmarks.md "The publish rule").

No torch here: per-row scores are plain floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scipy.stats import binomtest

from app.contract.kinds import EvalMetric

# One-sided: a job refuses when the bare template's lead on the hold-out would come by chance less often
# than this. Not the customary 0.05: on hold-outs of 20 and 40 rows that refused 1 run of 20, and
# published prompts 19 and 26 points worse than the bare template on the test split (p 0.105 and 0.254);
# at 0.30 those were refused and no prompt better on the test split was (docs/benchmarks.md, "The publish
# rule").
# A lead of one row is never refused (its chance is 0.5 or more), however many rows differ.
REFUSE_BELOW_P = 0.30
# A hold-out of fewer rows cannot tell (datasets under 200 examples hold out under 20): the job publishes
# what it kept and reports both scores. At 0.30 two rows both won by the bare template would refuse.
MIN_ROWS = 20


@dataclass(frozen=True)
class Comparison:
    """A tuned prompt against the bare template on the same hold-out rows, by one metric."""

    metric: EvalMetric
    rows: int  # hold-out rows compared
    prompt_better: int  # rows the tuned prompt scored better
    bare_better: int  # rows the bare template scored better
    p_value: float  # one-sided: a lead of the bare template this large, or larger, by chance alone
    refuse_below_p: float
    worse: bool  # the verdict: the bare template is better beyond the hold-out's noise

    def as_metrics(self) -> dict:
        return {**asdict(self), "metric": self.metric.value, "test": "sign test (exact, one-sided)"}

    def reason(self) -> str:
        """Why the rule decided as it did, in words a person reads in a job's error."""
        if self.rows < MIN_ROWS:
            return f"a hold-out of {self.rows} rows is too small to tell (the rule needs {MIN_ROWS})"
        return (
            f"on {self.rows} hold-out rows the bare template scored better on {self.bare_better} and the "
            f"prompt on {self.prompt_better}; a lead this large comes by chance with probability "
            f"{self.p_value:.3g} (one-sided sign test), "
            + (
                f"under the {self.refuse_below_p:g} the rule allows"
                if self.worse
                else f"not under the {self.refuse_below_p:g} that would refuse it"
            )
        )


def compare(
    tuned: list[float], bare: list[float], metric: EvalMetric, *, refuse_below_p: float = REFUSE_BELOW_P
) -> Comparison:
    """``tuned`` and ``bare``: each hold-out row's score by ``metric``, in the same row order (for the loss,
    lower is better). Never ``worse`` on fewer than MIN_ROWS rows."""
    if len(tuned) != len(bare):
        raise ValueError(f"{len(tuned)} tuned scores against {len(bare)} bare ones")
    sign = -1.0 if metric is EvalMetric.LOSS else 1.0
    prompt_better = sum(sign * (t - b) > 0 for t, b in zip(tuned, bare, strict=True))
    bare_better = sum(sign * (b - t) > 0 for t, b in zip(tuned, bare, strict=True))
    differing = prompt_better + bare_better
    p_value = (
        float(binomtest(bare_better, differing, 0.5, alternative="greater").pvalue) if differing else 1.0
    )
    return Comparison(
        metric=metric,
        rows=len(tuned),
        prompt_better=int(prompt_better),
        bare_better=int(bare_better),
        p_value=p_value,
        refuse_below_p=refuse_below_p,
        worse=len(tuned) >= MIN_ROWS and p_value < refuse_below_p,
    )
