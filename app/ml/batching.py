"""How rows are tokenised and laid out. Training, scoring and generation all build their batches here, so a
prompt sees exactly the token sequence at inference that it was trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.errors import InvalidRequest
from app.ml.backbone import Backbone
from app.ml.text import continuation


def encode(backbone: Backbone, text: str) -> list[int]:
    """Token ids of ``text`` alone: no BOS/EOS, so pieces tokenised separately concatenate cleanly."""
    if not text:
        return []
    return list(backbone.tokenizer(text, add_special_tokens=False)["input_ids"])


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
PACK_ENTRIES = 1024


def target_log_probs(
    backbone: Backbone,
    prompts: list[torch.Tensor | None],
    contexts: list[list[int]],
    targets: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(each target token | prompt, context, earlier targets) for rows [prompt][context][targets].

    Returns ``(log_probs [N] float32, row_of [N] long)`` over all N target tokens of the batch.

    Rows are packed end to end instead of padded: each row's positions restart at 0, and the model then
    builds a block-diagonal causal mask, so a row attends only to itself. Every entry the decoder runs is
    real (padded SST-2 batches are about half padding), and the LM head runs only at the N predicting
    positions: with a 49k vocabulary it would otherwise dominate the cost.
    """
    device, embed = backbone.device, backbone.model.get_input_embeddings()
    where = []  # where[i]: (pack, offset of row i's first entry in it)
    packs: list[list[torch.Tensor]] = [[]]
    used = 0
    for prompt, context, target in zip(prompts, contexts, targets, strict=True):
        tokens = embed(torch.tensor(context + target, dtype=torch.long, device=device))  # [n, d]
        if prompt is not None:
            # No detach: when training, the gradient reaches the prompt through this cat.
            tokens = torch.cat([prompt.to(device, backbone.dtype), tokens])  # [k + n, d]
        if used and used + len(tokens) > PACK_ENTRIES:
            packs.append([])
            used = 0
        where.append((len(packs) - 1, used))
        packs[-1].append(tokens)
        used += len(tokens)
    width = max(sum(len(t) for t in pack) for pack in packs)
    rows, positions = [], []
    for pack in packs:
        spare = width - sum(len(t) for t in pack)
        # The spare tail is one more segment of zeros: masked off from the real rows like any other row.
        rows.append(torch.cat([*pack, pack[0].new_zeros(spare, pack[0].shape[1])]))  # [width, d]
        positions.append(
            torch.cat(
                [torch.arange(len(t), device=device) for t in pack] + [torch.arange(spare, device=device)]
            )
        )
    hidden = backbone.model.get_decoder()(
        inputs_embeds=torch.stack(rows),  # [P, width, d]
        position_ids=torch.stack(positions),  # [P, width]: restarts at 0 at each row
        attention_mask=None,  # None + restarting positions: the model masks each row off from the others
        use_cache=False,
    ).last_hidden_state  # [P, width, d]
    rows_of, packs_of, columns, wanted = [], [], [], []
    for i, ((pack, offset), prompt, context, target) in enumerate(
        zip(where, prompts, contexts, targets, strict=True)
    ):
        first = offset + (0 if prompt is None else len(prompt)) + len(context) - 1  # predicts target[0]
        rows_of += [i] * len(target)
        packs_of += [pack] * len(target)
        columns += range(first, first + len(target))
        wanted += target
    row_of = torch.tensor(rows_of, dtype=torch.long, device=device)
    picked = hidden[torch.tensor(packs_of, device=device), torch.tensor(columns, device=device)]  # [N, d]
    logits = backbone.model.get_output_embeddings()(picked).float()  # [N, V]
    log_probs = logits.log_softmax(-1).gather(
        -1, torch.tensor(wanted, dtype=torch.long, device=device)[:, None]
    )[:, 0]  # [N]
    return log_probs, row_of
