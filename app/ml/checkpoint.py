"""A training run's full state, so that a run stopped after any step continues on another worker exactly as
if it had never stopped: the same next batch, the same optimiser moments, the same best prompt so far.

Serialised as safetensors (tensors) with the rest as JSON in its metadata: no pickle, nothing executed on
load. A few hundred kilobytes for a 20-token prompt, so it is kept in the registry database
(app/services/tuning/checkpoints.py), where every worker, on any machine, finds it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save


@dataclass
class Checkpoint:
    step: int  # steps done
    prompt: torch.Tensor  # [k, d] (prompt) or [2, L, H_kv, k, Dh] (prefix), float32
    optimizer: dict  # torch optimizer state_dict()
    batch_rng: torch.Tensor  # uint8: the batch order's generator state
    pending: list[int]  # example indices drawn for the next batches, not used yet
    losses: list[float]
    best_step: int = 0
    best_prompt: torch.Tensor | None = None  # as prompt
    best_metrics: dict = field(default_factory=dict)
    evaluations_since_best: int = 0


def checkpoint_to_bytes(checkpoint: Checkpoint) -> bytes:
    tensors = {"prompt": checkpoint.prompt.detach().cpu().contiguous(), "batch_rng": checkpoint.batch_rng}
    if checkpoint.best_prompt is not None:
        tensors["best_prompt"] = checkpoint.best_prompt.detach().cpu().contiguous()
    optimizer_scalars: dict[str, dict] = {}
    for param_id, state in checkpoint.optimizer["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                optimizer_scalars.setdefault(str(param_id), {})[name] = value
    meta = {
        "step": checkpoint.step,
        "pending": checkpoint.pending,
        "losses": checkpoint.losses,
        "best_step": checkpoint.best_step,
        "best_metrics": checkpoint.best_metrics,
        "evaluations_since_best": checkpoint.evaluations_since_best,
        "optimizer_param_groups": checkpoint.optimizer["param_groups"],
        "optimizer_scalars": optimizer_scalars,
    }
    return save(tensors, metadata={"checkpoint": json.dumps(meta)})


def checkpoint_from_bytes(data: bytes) -> Checkpoint:
    # The safetensors layout: an 8-byte little-endian header length, then the JSON header with the metadata.
    header_length = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8 : 8 + header_length])["__metadata__"]["checkpoint"])
    tensors = load(data)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, scalars in meta["optimizer_scalars"].items():
        state.setdefault(int(param_id), {}).update(scalars)
    return Checkpoint(
        step=meta["step"],
        prompt=tensors["prompt"],
        optimizer={"state": state, "param_groups": meta["optimizer_param_groups"]},
        batch_rng=tensors["batch_rng"],
        pending=meta["pending"],
        losses=meta["losses"],
        best_step=meta["best_step"],
        best_prompt=tensors.get("best_prompt"),
        best_metrics=meta["best_metrics"],
        evaluations_since_best=meta["evaluations_since_best"],
    )
