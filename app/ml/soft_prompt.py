"""Soft prompts as plain tensors: how they start, and how they travel (safetensors bytes, never pickle).

A soft prompt is one tensor, of one of two kinds:
- **prompt tuning** (Lester et al.): ``[k, d]`` input embeddings, run through the backbone in front of
  the input;
- **prefix tuning** (deep prompts: Li & Liang; P-tuning v2): ``[2, L, H_kv, k, Dh]`` keys and values for
  k positions in every layer (rotary position already applied, as the backbone's own positions 0..k-1
  would leave them), which the input attends to directly (app/ml/prefix.py makes them).

Either way the virtual tokens are the second-to-last dimension, and everything that runs a soft prompt
turns it into keys and values first (app/ml/prompt_kv.py)."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.contract.kinds import PROMPT_INITS, InitStrategy, Method
from app.errors import InvalidRequest, PromptCorrupt
from app.ml.backbone import Backbone, encode
from app.ml.text import continuation

PROMPT_KEY = "prompt_embeddings"


# Lester et al. initialise from the 5,000 most frequent tokens; BPE vocabularies are built merge by merge,
# so low ids are a cheap stand-in for frequency.
FREQUENT_VOCAB = 5000


def init_prompt(
    backbone: Backbone,
    *,
    num_virtual_tokens: int,
    strategy: str,
    text: str | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A fresh prompt, [num_virtual_tokens, d] float32 on CPU."""
    k = num_virtual_tokens
    if k < 1:
        raise InvalidRequest("num_virtual_tokens must be at least 1", param="num_virtual_tokens")
    table = backbone.model.get_input_embeddings().weight.detach()  # [V, d]
    generator = torch.Generator().manual_seed(seed)
    if strategy == InitStrategy.TEXT:
        if not text or not text.strip():
            raise InvalidRequest("the text strategy needs a non-empty init text", param="init")
        ids = _cycle(encode(backbone, text), k)
    elif strategy == InitStrategy.LABELS:
        # Labels are scored as they follow an input (" positive"), so start from those tokens.
        ids = [i for label in labels or [] if label for i in encode(backbone, continuation(".", label))]
        if not ids:
            raise InvalidRequest("the labels strategy needs a dataset with labels", param="init")
        ids = _cycle(ids, k)
    elif strategy == InitStrategy.VOCAB:
        high = min(FREQUENT_VOCAB, table.shape[0])
        ids = torch.randint(0, high, (k,), generator=generator).tolist()
    elif strategy == InitStrategy.RANDOM:
        std = table.float().std().item()
        return torch.randn(k, table.shape[1], generator=generator) * std  # [k, d]
    else:
        raise InvalidRequest(
            f"unknown init strategy {strategy!r}; one of {', '.join(PROMPT_INITS)}", param="init"
        )
    return table[torch.tensor(ids, device=table.device)].float().cpu().clone()  # [k, d]


def virtual_tokens(prompt: torch.Tensor | None) -> int:
    """k, the positions a soft prompt of either kind occupies in front of the input (0 for none)."""
    return 0 if prompt is None else int(prompt.shape[-2])


def is_prefix(prompt: torch.Tensor) -> bool:
    """Whether ``prompt`` is a prefix ([2, L, H_kv, k, Dh] keys and values) rather than embeddings."""
    return prompt.ndim == 5


def _cycle(ids: list[int], k: int) -> list[int]:
    return (ids * math.ceil(k / len(ids)))[:k]


def prompt_to_bytes(prompt: torch.Tensor) -> bytes:
    return st_save({PROMPT_KEY: prompt.detach().to("cpu", torch.float32).contiguous()})


def stored_shape(backbone: Backbone, method: Method) -> tuple[int | None, ...]:
    """The shape a ``method``'s soft prompt has on ``backbone``; None where k goes."""
    if method == Method.PREFIX:
        kv = backbone.kv
        return (2, kv.layers, kv.heads, None, kv.head_dim)
    return (None, backbone.embedding_dim)


def loose_shape(method: Method, embedding_dim: int) -> tuple[int | None, ...]:
    """The shape of a stored soft prompt when its backbone is not at hand (an export): a prefix's layers
    and heads are whatever it holds."""
    return (2, None, None, None, None) if method == Method.PREFIX else (None, embedding_dim)


def prompt_from_bytes(data: bytes, *, shape: tuple[int | None, ...]) -> torch.Tensor:
    """The float32 soft prompt stored in ``data``, of ``shape`` (None where k goes, k >= 1: see
    ``stored_shape`` and ``loose_shape``); PromptCorrupt unless it is exactly that and finite."""
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types and OSError on garbage
        raise PromptCorrupt(f"prompt bytes are not a readable safetensors file: {exc}") from exc
    if set(tensors) != {PROMPT_KEY}:
        raise PromptCorrupt(f"prompt file must hold exactly {PROMPT_KEY!r}, found {sorted(tensors)}")
    prompt = tensors[PROMPT_KEY]
    if prompt.dtype != torch.float32:
        raise PromptCorrupt(f"prompt must be float32, found {prompt.dtype}")
    fits = prompt.ndim == len(shape) and all(
        (size >= 1) if want is None else size == want for size, want in zip(prompt.shape, shape, strict=True)
    )
    if not fits:
        wanted = ", ".join("k >= 1" if want is None else str(want) for want in shape)
        raise PromptCorrupt(f"prompt shape {tuple(prompt.shape)} is not [{wanted}]")
    if not torch.isfinite(prompt).all():
        raise PromptCorrupt("prompt contains NaN or infinite values")
    return prompt
