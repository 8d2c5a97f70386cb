"""How rows are tokenised and laid out. Training, scoring and generation all build their batches here, so a
prompt sees exactly the token sequence at inference that it was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from app.errors import InvalidRequest
from app.ml.backbone import Backbone, encode
from app.ml.soft_prompt import is_prefix, virtual_tokens
from app.ml.text import continuation


def context_ids(backbone: Backbone, rendered: str) -> list[int]:
    """The tokens of a rendered input. An empty context becomes a lone end-of-text token, as after a
    document boundary: the first output token needs a position to be predicted from when there is no
    soft prompt either."""
    return encode(backbone, rendered) or [backbone.eos_token_id]


def target_ids(backbone: Backbone, rendered: str, output: str, *, with_eos: bool) -> list[int]:
    ids = encode(backbone, continuation(rendered, output))
    return [*ids, backbone.eos_token_id] if with_eos else ids


def fit_context(backbone: Backbone, context: list[int], reserved: int, *, truncate: bool) -> list[int]:
    """``context`` cut from the left so ``reserved`` more positions (prompt, targets, new tokens) still fit
    in the backbone's window; the end of an input sits next to the output and matters most."""
    budget = backbone.max_length - reserved
    if len(context) <= budget:
        return context
    if not truncate or budget < 1:
        raise InvalidRequest(
            f"input is {len(context)} tokens; at most {max(budget, 0)} fit with this prompt and output",
            param="input",
        )
    return context[-budget:]


def token_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices of ``sizes`` in groups whose sizes sum to at most ``budget``; an item larger than
    the budget makes a group of its own."""
    groups: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += size
    return groups


@dataclass
class Batch:
    """Rows of [soft prompt][token ids], padded to a rectangle. Positions count only real entries, so a
    row's numbers do not depend on how much padding its neighbours forced on it."""

    inputs_embeds: torch.Tensor  # [B, T, d] backbone dtype
    attention_mask: torch.Tensor  # [B, T] long, 1 for real entries
    position_ids: torch.Tensor  # [B, T] long
    starts: list[int]  # index of each row's first real entry (non-zero only with left padding)
    lengths: list[int]  # real entries per row: k + len(ids)


def build_batch(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    ids: list[list[int]],
    *,
    left_pad: bool,
) -> Batch:
    embed = backbone.model.get_input_embeddings()
    pieces = []
    for prompt, row_ids in zip(prompts, ids, strict=True):
        tokens = embed(torch.tensor(row_ids, dtype=torch.long, device=backbone.device))  # [n, d]
        if prompt is not None:
            # No detach: when training, the gradient reaches the prompt through this cat.
            tokens = torch.cat([prompt.to(backbone.device, backbone.dtype), tokens])  # [k + n, d]
        pieces.append(tokens)
    lengths = [len(p) for p in pieces]
    width = max(lengths)
    rows, masks, starts = [], [], []
    for piece, n in zip(pieces, lengths, strict=True):
        pad = width - n
        start = pad if left_pad else 0
        rows.append(torch.nn.functional.pad(piece, (0, 0, pad, 0) if left_pad else (0, 0, 0, pad)))
        mask = torch.zeros(width, dtype=torch.long, device=backbone.device)
        mask[start : start + n] = 1
        masks.append(mask)
        starts.append(start)
    attention_mask = torch.stack(masks)  # [B, T]
    # Padding gets position 0: it is masked out anyway, and 0 keeps RoPE inputs in range.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    return Batch(torch.stack(rows), attention_mask, position_ids, starts, lengths)


# Rows are packed end to end into sequences of at most this many entries (a longer row gets one alone).
# Attention inside a pack is dense under the mask, so its cost grows with the pack's square: with 32 SST-2
# rows in one 1,024-entry pack it was a quarter of a training step; 128-entry packs make it a twentieth
# and the step about 10 % faster on 2 CPU cores (docs/benchmarks.md).
PACK_ENTRIES = 128


def balanced_packs(sizes: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` in as few packs as ``capacity`` allows (a longer item raises it), spread so the
    packs come out about equally long: every pack is padded to the longest, so a greedy fill that leaves
    the last pack short pays for the gap (8 SST-2 rows: 125 and 25 entries, run as 2 x 125). Longest
    first, each to the shortest pack so far; a pack keeps its items in their order."""
    if not sizes:
        return []
    capacity = max(capacity, max(sizes))
    count = -(-sum(sizes) // capacity)
    packs: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        shortest = loads.index(min(loads))
        packs[shortest].append(index)
        loads[shortest] += sizes[index]
    return [sorted(pack) for pack in packs if pack]


def target_log_probs(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    contexts: list[list[int]],
    targets: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(each target token | prompt, context, earlier targets) for rows [prompt][context][targets].

    Returns ``(log_probs [N] float32, row_of [N] long)`` over all N target tokens of the batch."""
    logits, row_of = target_logits(backbone, prompts, contexts, targets)  # [N, V]
    wanted = torch.tensor([t for target in targets for t in target], dtype=torch.long, device=logits.device)
    return logits.log_softmax(-1).gather(-1, wanted[:, None])[:, 0], row_of  # [N]


def target_logits(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    contexts: list[list[int]],
    targets: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token logits at the position that predicts each target token: ``(logits [N, V] float32,
    row_of [N] long)``.

    Three things keep this cheap, which is most of what training costs:
    - When every row has the same prompt (training, evaluation), the prompt's k positions run once for the
      batch, not once per row: they see only themselves, so their keys and values are the same in every
      row. The rows then attend to them as a cache prefix, and the gradient reaches the prompt through it.
    - Rows are packed end to end instead of padded (padded SST-2 batches are about half padding): a mask
      lets each row see the prefix and itself, and positions count from the row's own start.
    - The LM head runs only at the N predicting positions: with a 49k vocabulary it would otherwise
      dominate the cost.

    A prefix (keys and values, app/ml/soft_prompt.py) is always a cache prefix: rows with different
    prefixes run in one pass per prefix.
    """
    device, dtype, embed = backbone.device, backbone.dtype, backbone.model.get_input_embeddings()
    shared = (
        prompts[0] if prompts and prompts[0] is not None and all(p is prompts[0] for p in prompts) else None
    )
    if shared is None and any(p is not None and is_prefix(p) for p in prompts):
        return _per_prompt(backbone, prompts, contexts, targets)
    k = virtual_tokens(shared)
    pieces = []
    for prompt, context, target in zip(prompts, contexts, targets, strict=True):
        tokens = embed(torch.tensor(context + target, dtype=torch.long, device=device))  # [n, d]
        if prompt is not None and shared is None:
            # No detach: when training, the gradient reaches the prompt through this cat.
            tokens = torch.cat([prompt.to(device, dtype), tokens])  # [k_i + n, d]
        pieces.append(tokens)
    where = []  # where[i]: (pack, column of row i's first entry in it)
    packs: list[list[torch.Tensor]] = []
    for pack, members in enumerate(balanced_packs([len(t) for t in pieces], PACK_ENTRIES)):
        packs.append([])
        used = 0
        for i in members:
            where.append((i, pack, used))
            packs[-1].append(pieces[i])
            used += len(pieces[i])
    where = [(pack, column) for _, pack, column in sorted(where)]
    width = max(sum(len(t) for t in pack) for pack in packs)
    rows, positions, masks = [], [], []
    for pack in packs:
        spare = width - sum(len(t) for t in pack)
        # The spare tail is one more segment of zeros, masked off from the real rows like any other row.
        rows.append(torch.cat([*pack, pack[0].new_zeros(spare, pack[0].shape[1])]))  # [W, d]
        lengths = [len(t) for t in pack] + [spare]
        positions.append(torch.cat([torch.arange(k, k + n, device=device) for n in lengths]))  # [W]
        masks.append(_packed_mask(lengths, k, device))  # [W, k + W]
    cache = None if shared is None else _prompt_cache(backbone, shared, len(packs))
    mask = torch.stack(masks)[:, None]  # [P, 1, W, k + W]: True where a query may look
    hidden = backbone.model.get_decoder()(
        inputs_embeds=torch.stack(rows),  # [P, W, d]
        position_ids=torch.stack(positions),  # [P, W]
        attention_mask=additive_mask(mask, dtype),
        cache=cache,
        use_cache=cache is not None,
    ).last_hidden_state  # [P, W, d]
    rows_of, packs_of, columns = [], [], []
    for i, ((pack, offset), prompt, context, target) in enumerate(
        zip(where, prompts, contexts, targets, strict=True)
    ):
        own_prompt = 0 if prompt is None or shared is not None else len(prompt)
        first = offset + own_prompt + len(context) - 1  # the column that predicts target[0]
        rows_of += [i] * len(target)
        packs_of += [pack] * len(target)
        columns += range(first, first + len(target))
    row_of = torch.tensor(rows_of, dtype=torch.long, device=device)
    picked = hidden[torch.tensor(packs_of, device=device), torch.tensor(columns, device=device)]  # [N, d]
    return backbone.logits(picked), row_of  # [N, V]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True where a query may look, [B, 1, q, T]) as the additive float mask the decoder
    takes as is. Every forward pass here gets one of these rather than a [B, T] padding mask: from a 4D mask
    the model builds nothing of its own, so no family's sliding window or other rule slips in between
    (rows never outgrow the window: Backbone.max_length)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _per_prompt(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    contexts: list[list[int]],
    targets: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_logits`` one pass per distinct prompt, the results put back in the rows' order."""
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(id(prompt), []).append(index)
    logits, rows = [], []
    for indices in groups.values():
        part, row_of = target_logits(
            backbone,
            [prompts[i] for i in indices],
            [contexts[i] for i in indices],
            [targets[i] for i in indices],
        )
        logits.append(part)
        rows.append(torch.tensor(indices, device=row_of.device)[row_of])
    row_of = torch.cat(rows)
    order = torch.argsort(row_of, stable=True)  # each row's targets stay in their order
    return torch.cat(logits)[order], row_of[order]


def _packed_mask(lengths: list[int], prefix: int, device: torch.device) -> torch.Tensor:
    """[W, prefix + W] bool: every entry sees the shared prefix, then the earlier entries of its own row."""
    segment = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )  # [W]
    width = len(segment)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    own_row = segment[:, None] == segment[None, :]
    return torch.cat([torch.ones(width, prefix, dtype=torch.bool, device=device), causal & own_row], dim=1)


def _prompt_cache(backbone: Backbone, prompt: torch.Tensor, copies: int) -> DynamicCache:
    """The prompt run alone at positions 0..k-1, its keys and values repeated for ``copies`` packs (a
    prefix is them already: no forward pass). Built with autograd on when the caller trains, so the loss
    reaches the prompt through them."""
    if is_prefix(prompt):
        keys, values = prompt.to(backbone.device, backbone.dtype)  # each [L, H_kv, k, Dh]
        return DynamicCache(
            ddp_cache_data=[
                (k[None].expand(copies, -1, -1, -1), v[None].expand(copies, -1, -1, -1))
                for k, v in zip(keys, values, strict=True)
            ]
        )
    cache = DynamicCache()  # plain layers: one built from the config may slide and drop entries
    backbone.model.get_decoder()(
        inputs_embeds=prompt.to(backbone.device, backbone.dtype)[None],  # [1, k, d]
        position_ids=torch.arange(len(prompt), device=backbone.device)[None],
        cache=cache,
        use_cache=True,
    )
    return DynamicCache(
        ddp_cache_data=[
            (layer.keys.expand(copies, -1, -1, -1), layer.values.expand(copies, -1, -1, -1))
            for layer in cache.layers
        ]
    )
