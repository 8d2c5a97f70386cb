"""Deep prompts (prefix tuning; Li & Liang 2021, P-tuning v2): keys and values for k virtual positions in
every layer, learned directly. The serving side already runs every soft prompt as such keys and values
(app/ml/prompt_kv.py), so a prefix is served like a prompt-tuned version at no extra cost; training it
needs no forward pass over the k positions, and it reaches every layer instead of only the input."""

from __future__ import annotations

import torch

from app.contract.kinds import INITS, InitStrategy, Method
from app.errors import InvalidRequest
from app.ml.backbone import Backbone
from app.ml.prompt_kv import compute_prompt_kv
from app.ml.soft_prompt import init_prompt

# "zero": keys and values of zero (the input at first attends a little to nothing); "random": Gaussian at
# the scale of real tokens' keys and values; the rest: the keys and values real tokens leave (below).


def init_prefix(
    backbone: Backbone,
    *,
    num_virtual_tokens: int,
    strategy: str,
    text: str | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A fresh prefix, [2, L, H_kv, k, Dh] float32 on CPU.

    From text (``text``, ``labels``, ``vocab``) it is exactly the keys and values those k tokens leave at
    positions 0..k-1: the model starts where prompt tuning with the same init starts, and the prefix's
    extra freedom (every layer on its own) is all gained in training."""
    if strategy not in INITS[Method.PREFIX]:
        raise InvalidRequest(
            f"unknown init strategy {strategy!r}; one of {', '.join(INITS[Method.PREFIX])}", param="init"
        )
    from_text = InitStrategy.VOCAB if strategy in (InitStrategy.ZERO, InitStrategy.RANDOM) else strategy
    k = num_virtual_tokens
    embeddings = init_prompt(
        backbone, num_virtual_tokens=k, strategy=from_text, text=text, labels=labels, seed=seed
    )  # [k, d]
    kv = compute_prompt_kv(backbone, embeddings)
    prefix = torch.stack([kv.keys, kv.values]).float().cpu()  # [2, L, H_kv, k, Dh]
    if strategy == InitStrategy.ZERO:
        return torch.zeros_like(prefix)
    if strategy == InitStrategy.RANDOM:
        generator = torch.Generator().manual_seed(seed)
        # Each layer's keys and values have their own scale (rotary keys grow with depth); match it.
        scale = prefix.std(dim=(2, 3, 4), keepdim=True)  # [2, L, 1, 1, 1]
        return torch.randn(prefix.shape, generator=generator) * scale
    return prefix.clone()
