"""A task's template: the text around each input, which goes where ``{input}`` is (app/ml/text.py
renders it)."""

from __future__ import annotations

INPUT_PLACEHOLDER = "{input}"
DEFAULT_TEMPLATE = INPUT_PLACEHOLDER
