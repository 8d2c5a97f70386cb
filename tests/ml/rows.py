"""Inputs and random prompts for the tiny backbone, shared by the inference and engine tests."""

from __future__ import annotations

import torch

WORDS = [
    "the",
    "film",
    "is",
    "a",
    "great",
    "dull",
    "story",
    "cast",
    "moving",
    "boring",
    "fun",
    "bad",
    "good",
    "plot",
]


def random_prompt(k: int, seed: int, d: int = 64) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) * 0.2


def input_text(i: int) -> str:
    """The i-th input: 1 to 19 words, different for neighbouring i."""
    return " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(1 + (i * 7) % 19))
