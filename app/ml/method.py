"""The tuning methods and how each may start, named once for every layer. No torch here: the API's schemas,
and so its client, import this."""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    """How a soft prompt is learned and what it is (app/ml/soft_prompt.py)."""

    PROMPT = "prompt"  # input embeddings in front of the input (Lester et al.)
    PREFIX = "prefix"  # keys and values in every layer (prefix tuning, P-tuning v2)


# Initialisations: from text (the given text, the task's label words, frequent vocabulary) or random; a
# prefix may also start at zero.
PROMPT_INITS = ("text", "labels", "vocab", "random")
PREFIX_INITS = (*PROMPT_INITS, "zero")
INITS = {Method.PROMPT: PROMPT_INITS, Method.PREFIX: PREFIX_INITS}
