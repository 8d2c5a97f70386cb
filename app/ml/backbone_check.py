"""Whether a backbone works the way every soft prompt here is run, checked once when it is loaded.

Serving, scoring and training put a soft prompt in front of the input as keys and values in a
``DynamicCache``, pack or pad rows under a 4D attention mask of our own, and count positions ourselves
(app/ml/layout.py, app/ml/decode_batch.py). A decoder family that ignores such a mask, attends both ways,
keeps no per-layer keys and values, or computes attention some other way would not fail: it would answer
wrongly. So the check runs a short sequence both ways, through our paths and through the model's own
forward pass over the whole sequence, and refuses the backbone when the next-token logits differ."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from app.errors import UnsupportedBackbone

PROBE_TOKENS = 8
PROBE_PROMPT = 3  # of the probe's tokens, the first ones stand in for a soft prompt
# Logits that agree to this fraction of their spread are the same computation in another order; a model
# that attends differently is off by the spread itself. bfloat16 rounds at about 1e-2.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


@dataclass(frozen=True)
class KVShape:
    """The keys and values one position leaves: ``layers`` x ``heads`` x ``head_dim``, per key and value."""

    layers: int
    heads: int
    head_dim: int


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head over decoder outputs [..., d], as float32 [..., V], with the final soft-capping of the
    families that have one (Gemma 2: ``cap * tanh(logits / cap)``), which the model's own forward applies
    after its head and a bare call of the head would skip."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def attention_window(model: PreTrainedModel) -> int:
    """The longest sequence this backbone attends over in full. With sliding-window layers that is the
    window: within it, sliding and full attention are the same computation, so our own masks (which do not
    slide) stay exact."""
    config = model.config
    length = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    slides = window and (layer_types is None or "sliding_attention" in layer_types)
    return min(length, int(window)) if slides else length


def check_backbone(name: str, model: PreTrainedModel) -> KVShape:
    """The backbone's keys-and-values shape, or UnsupportedBackbone naming ``name`` and the reason."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedBackbone(f"backbone {name!r}: encoder-decoder models are not supported")
    if not hasattr(model, "get_decoder"):
        raise UnsupportedBackbone(f"backbone {name!r}: {type(model).__name__} has no decoder to run")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(PROBE_TOKENS, device=device) * 7919 % vocab + 1  # fixed, spread over the vocabulary
    try:
        with torch.inference_mode():
            reference = model(input_ids=ids[None]).logits[0].float()  # [n, V]: the model's own way
            shape, ours = _our_logits(model, ids, dtype)  # [n - PROBE_PROMPT, V]
    except UnsupportedBackbone as exc:
        raise UnsupportedBackbone(f"backbone {name!r}: {exc}") from None
    except Exception as exc:  # any family-specific failure means the same: it cannot run our way
        raise UnsupportedBackbone(
            f"backbone {name!r}: {type(model).__name__} cannot run a soft prompt as cached keys and "
            f"values ({type(exc).__name__}: {exc})"
        ) from exc
    wanted = reference[PROBE_PROMPT:]
    spread = float(wanted.std()) or 1.0
    error = float((ours - wanted).abs().max())
    if error > TOLERANCE.get(dtype, 6e-2) * spread:
        raise UnsupportedBackbone(
            f"backbone {name!r}: {type(model).__name__} gives other next-token scores when the start of a "
            f"sequence is passed as cached keys and values under an explicit causal mask (off by "
            f"{error:.3g}; the scores' spread is {spread:.3g}): it does not attend as soft prompts need"
        )
    return shape


def _our_logits(
    model: PreTrainedModel, ids: torch.Tensor, dtype: torch.dtype
) -> tuple[KVShape, torch.Tensor]:
    """The logits for ids[PROBE_PROMPT:] with ids[:PROBE_PROMPT] run first into a cache, then continued
    under an explicit 4D mask and counted positions, as app/ml/layout.py does."""
    decoder, k = model.get_decoder(), PROBE_PROMPT
    embeds = model.get_input_embeddings()(ids[None])  # [1, n, d]
    cache = DynamicCache()
    decoder(
        inputs_embeds=embeds[:, :k],
        position_ids=torch.arange(k, device=ids.device)[None],
        cache=cache,
        use_cache=True,
    )
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UnsupportedBackbone("it keeps no keys and values per layer (not an attention decoder?)")
    shapes = {tuple(layer.keys.shape) for layer in layers} | {tuple(layer.values.shape) for layer in layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise UnsupportedBackbone(f"its layers keep keys and values of different shapes {sorted(shapes)}")
    _, heads, _, head_dim = next(iter(shapes))
    shape = KVShape(layers=len(layers), heads=heads, head_dim=head_dim)
    keys = [layer.keys for layer in layers]
    values = [layer.values for layer in layers]
    rest = len(ids) - k
    allowed = torch.ones(rest, k + rest, dtype=torch.bool, device=ids.device)
    allowed[:, k:] = torch.ones(rest, rest, dtype=torch.bool, device=ids.device).tril()
    mask = torch.zeros(1, 1, rest, k + rest, dtype=dtype, device=ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    hidden = decoder(
        inputs_embeds=embeds[:, k:],
        position_ids=torch.arange(k, len(ids), device=ids.device)[None],
        attention_mask=mask,
        cache=DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True))),
        use_cache=True,
    ).last_hidden_state  # [1, rest, d]
    return shape, head_logits(model, hidden)[0]
