"""Whether a soft prompt is safe to put in the batch beside other tenants' rows: its values on the
backbone's own scale, and finite scores on a probe input. Checked where a prompt enters the registry (a
PEFT import, a job's result before it is published); if one slips through anyway, the engine fails its
rows alone (app/ml/row.py ``choose_tokens``).

A prefix of finite but huge values (3e38 passes a NaN check) overflows attention: its scores are
infinite or NaN, and sampling from them raised. Runs the backbone: call it where the backbone may run
(the engine's thread, a worker)."""

from __future__ import annotations

import torch

from app.contract.kinds import InitStrategy
from app.ml.backbone import Backbone
from app.ml.layout import context_ids, target_ids, target_logits
from app.ml.prefix import init_prefix
from app.ml.soft_prompt import is_prefix

# How far past the largest value the backbone itself puts where a soft prompt goes (an input embedding;
# a key or value its layers compute for real text) a soft prompt may reach. Training moves a value by
# about the learning rate per step, so even long runs at Lester et al.'s 0.3 stay far inside this; what
# is past it was made to break something.
MAX_SCALE = 1000.0
PROBE_TEXT = "Review: a gorgeous, witty, seductive movie.\nSentiment:"
PROBE_OUTPUT = " positive"
_scales: dict[tuple[int, bool], float] = {}


def prompt_fault(backbone: Backbone, prompt: torch.Tensor) -> str | None:
    """What makes ``prompt`` ([k, d] or a prefix [2, L, H_kv, k, Dh]) unsafe to serve, in words that
    follow its tensor's name, or None."""
    if not torch.isfinite(prompt).all():
        return "contains NaN or infinite values"
    prefix = is_prefix(prompt)
    scale, peak = backbone_scale(backbone, prefix=prefix), float(prompt.abs().max())
    if peak > MAX_SCALE * scale:
        own = "keys and values" if prefix else "input embeddings"
        return (
            f"reaches {peak:.3g}; this backbone's own {own} reach {scale:.3g}, and a soft prompt may reach "
            f"{MAX_SCALE:g} times that"
        )
    context = context_ids(backbone, PROBE_TEXT)
    target = target_ids(backbone, PROBE_TEXT, PROBE_OUTPUT, with_eos=False)
    with torch.inference_mode():
        logits, _ = target_logits(backbone, [prompt.to(torch.float32)], [context], [target])  # [N, V]
    if not torch.isfinite(logits).all():
        return "gives the backbone scores that are not finite numbers on a probe input"
    return None


def backbone_scale(backbone: Backbone, *, prefix: bool) -> float:
    """The largest absolute value of the backbone's input embeddings, or of the keys and values its layers
    compute for the probe text; measured once per backbone."""
    key = (id(backbone.model), prefix)
    if key not in _scales:
        if prefix:
            tokens = len(context_ids(backbone, PROBE_TEXT))
            reference = init_prefix(
                backbone, num_virtual_tokens=tokens, strategy=InitStrategy.TEXT, text=PROBE_TEXT
            )
        else:
            reference = backbone.model.get_input_embeddings().weight.detach()
        _scales[key] = float(reference.float().abs().max())
    return _scales[key]
