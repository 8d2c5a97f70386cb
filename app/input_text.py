"""The one rule for the text and numbers clients send, applied where they enter the service: request bodies,
form fields, file names, path and query parameters (app/api/input_guard.py), dataset rows
(app/services/datasets/parsing.py) and the metadata inside an imported adapter
(app/services/registry/adapters.py).

- Text is valid Unicode. JSON can carry a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 encoder
  writes: the tokenizer, the database driver or the JSON response would fail on it later, after a version
  had perhaps been stored.
- Text holds no NUL. PostgreSQL refuses it in text and JSON columns while SQLite stores it, so the same
  request would be kept on one database and refused on the other.
- Numbers are finite. Python's JSON parser reads 1e400 as infinity and accepts NaN and Infinity, which
  PostgreSQL's JSON columns refuse and SQLite stores as non-standard JSON.
- JSON that a client sends inside something else (a dataset's lines, a form field, a file inside an
  uploaded archive) is read by ``parse_json``: nested at most MAX_JSON_DEPTH deep, integers of at most
  Python's 4,300 digits. Past either, Python's parser raises RecursionError or ValueError, which no
  caller expected: a 500 and a dropped connection, where a 422 naming the field is the answer.

Each violation is an InvalidRequest (422) naming the field, and the line for a dataset row.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from app.errors import InvalidRequest

_FORBIDDEN = re.compile("[\x00\ud800-\udfff]")
# No record, adapter config or label list nests this deep; a deeper one is an attack or a mistake.
MAX_JSON_DEPTH = 32


class JsonFault(ValueError):
    """Why a client's JSON cannot be read, in words (the caller names the place)."""


def parse_json(raw: str | bytes) -> Any:
    """``raw`` decoded, or JsonFault: not JSON (with the column), nested deeper than MAX_JSON_DEPTH, or an
    integer too long to read."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise JsonFault(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JsonFault(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise JsonFault("not UTF-8 text") from None
    except ValueError as exc:  # an integer over Python's digit limit
        raise JsonFault(str(exc)) from None
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return value
    if any(isinstance(item, dict | list) for item in level):
        raise JsonFault(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def load_json(raw: str | bytes, *, param: str) -> Any:
    """``parse_json`` for a field or a file of a request: InvalidRequest (422, ``invalid_json``) naming
    ``param``."""
    try:
        return parse_json(raw)
    except JsonFault as fault:
        message = f"{param} is not valid JSON: {fault}."
        raise InvalidRequest(message, param=param, code="invalid_json") from None


def text_fault(value: str) -> str | None:
    """What is wrong with ``value`` under the rule, in words, or None."""
    found = _FORBIDDEN.search(value)
    if found is None:
        return None
    if found.group() == "\x00":
        return f"contains a NUL character (at position {found.start()})"
    return (
        f"contains a lone UTF-16 surrogate (U+{ord(found.group()):04X} at position {found.start()}), "
        "which is not valid Unicode"
    )


def check_text(value: str, *, param: str, line: int | None = None, max_chars: int | None = None) -> str:
    """``value`` if it follows the rule and holds at most ``max_chars`` characters; else InvalidRequest."""
    fault = text_fault(value)
    if fault is not None:
        where = f"Line {line}: " if line is not None else ""
        raise InvalidRequest(f"{where}{param} {fault}.", param=param, line=line, code="invalid_text")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequest(
            f"{param} is {len(value)} characters; the limit is {max_chars}.", param=param, code="too_long"
        )
    return value


def check_json(value: Any, *, prefix: str | None = None) -> None:
    """Every string (object keys included) and every number in a decoded JSON value. ``param`` names the
    place as the rest of the API does: ``hyperparameters.max_grad_norm``, ``input.1``."""
    stack: list[tuple[Any, str | None]] = [(value, prefix)]
    while stack:  # a loop rather than recursion: a body may nest as deep as the parser allowed
        item, where = stack.pop()
        if isinstance(item, str):
            check_text(item, param=where or "body")
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidRequest(
                f"{where or 'body'} is {item}; numbers must be finite.", param=where, code="invalid_number"
            )
        elif isinstance(item, dict):
            for key, child in item.items():
                fault = text_fault(key)
                if fault is not None:  # the key itself can't be named: it is not writable text
                    raise InvalidRequest(
                        f"A key in {where or 'the body'} {fault}.", param=where, code="invalid_text"
                    )
                stack.append((child, _join(where, key)))
        elif isinstance(item, list):
            stack.extend((child, _join(where, str(index))) for index, child in enumerate(item))


def _join(prefix: str | None, name: str) -> str:
    return name if prefix is None else f"{prefix}.{name}"
