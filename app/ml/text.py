"""Text conventions shared by training and inference. A mismatch between the two silently costs accuracy,
so there is exactly one definition of how an input is wrapped and how an output follows it."""

from __future__ import annotations

from app.contract.templates import INPUT_PLACEHOLDER


def render(template: str, text: str) -> str:
    """The template with its ``{input}`` replaced by ``text``. Plain replacement, not ``str.format``, so
    braces in templates (JSON examples) and in client text need no escaping."""
    return template.replace(INPUT_PLACEHOLDER, text)


def continuation(rendered: str, output: str) -> str:
    """The text that follows a rendered input: the output after a single space, unless the rendered text
    is empty or already ends in white space. Label candidates in /v1/classify are built with this too."""
    if not rendered or rendered[-1].isspace():
        return output
    return " " + output
