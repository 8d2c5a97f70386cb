"""Parse and validate an uploaded dataset (JSONL or CSV) into normalised (input, output) pairs.

Pure functions: nothing here touches the database or the file system, so the caller can validate a whole
upload before storing anything, and every rejection is a ``DomainError`` with a stable ``code``, the 1-based
``line`` of the first bad record and, where one applies, the record field as ``param``.

Decisions (also the contract for callers and clients):

- The format comes from the file name's extension only (``.jsonl`` or ``.csv``, any case); the name never
  becomes a path.
- Accepted record shapes: ``{"text", "label"}`` (classification), ``{"input", "output"}`` and
  ``{"prompt", "completion"}`` (generation), and ``{"input", "references": [...]}`` (kind ``references``:
  a generation test set with one or more reference outputs per input, for evaluations; JSONL only, as a
  CSV cell holds no list). Every record must have the first record's shape. Extra keys
  (JSONL) and extra columns (CSV) are ignored, so exports carrying ids or metadata upload as they are. A
  record holding the fields of several shapes takes the first in that order.
- CSV header names are matched after stripping white space and ignoring case (spreadsheets capitalise);
  JSONL keys must match exactly.
- Fields must be JSON strings. The one exception is a classification ``label``, which may be a JSON integer
  and is stored as its decimal string, so ``{"label": 1}`` and the CSV cell ``1`` mean the same label.
  Booleans are refused even there: whether ``true`` should become "true" or "True" is a guess we won't make.
- Labels are stripped of surrounding white space (a stray space would silently create a second class);
  inputs and outputs are kept verbatim. CRLF line endings become LF in both formats, a leading UTF-8 BOM
  is dropped, blank lines are skipped but still counted for line numbers.
- ``too_many_examples`` is a 413 (``PayloadTooLarge``): like the byte limit, it is a size limit and the fix
  is to send less. Every other content fault is a 422 (``DatasetInvalid``); an unknown extension is a 415.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from app.contract.kinds import DatasetKind
from app.errors import DatasetInvalid, PayloadTooLarge, UnsupportedMediaType
from app.input_text import JsonFault, check_text, parse_json

ACCEPTED_EXTENSIONS = ("jsonl", "csv")
TOKEN_STATS_SAMPLE = 2_000
_CSV_FIELD_LIMIT = 2**31 - 1  # fits a C long on every platform

_BOM = b"\xef\xbb\xbf"
# Containers and encodings that are never a text dataset. Checked on the raw bytes, before decoding, so a
# zipped upload is named as such instead of failing as "not UTF-8 at line 1".
_MAGIC_NUMBERS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"PK\x07\x08", "zip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip"),
    (b"Rar!\x1a\x07", "RAR"),
    (b"%PDF-", "PDF"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"PAR1", "Parquet"),
    (b"SQLite format 3\x00", "SQLite"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "legacy Office"),
)
# UTF-32 first: its little-endian BOM starts with UTF-16's.
_WIDE_BOMS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


# (input, output): the output is a label, a target text, or (kind "references") a list of reference texts.
Record = tuple[str, str | list[str]]


def outputs_of(record: Record) -> list[str]:
    """A record's output texts: its one label or target, or all its references."""
    output = record[1]
    return output if isinstance(output, list) else [output]


@dataclass(frozen=True)
class ParsedDataset:
    format: str  # "jsonl" | "csv"
    kind: DatasetKind
    records: list[Record]  # normalised (input, output) pairs, in file order
    labels: list[str] | None  # sorted distinct labels for classification, else None
    sha256: str  # of the raw uploaded bytes


@dataclass(frozen=True)
class _Shape:
    kind: str
    input_field: str
    output_field: str

    @property
    def fields(self) -> tuple[str, str]:
        return (self.input_field, self.output_field)

    def describe(self) -> str:
        return f'{{"{self.input_field}", "{self.output_field}"}}'


# Order matters: a record carrying the fields of several shapes takes the first.
_SHAPES: tuple[_Shape, ...] = (
    _Shape(DatasetKind.CLASSIFICATION, "text", "label"),
    _Shape(DatasetKind.GENERATION, "input", "output"),
    _Shape(DatasetKind.GENERATION, "prompt", "completion"),
    _Shape(DatasetKind.REFERENCES, "input", "references"),
)
_SHAPES_TEXT = ", ".join(shape.describe() for shape in _SHAPES)


@dataclass(frozen=True)
class _Limits:
    min_examples: int
    max_examples: int
    max_chars: int
    max_references: int


def parse_dataset(
    data: bytes,
    *,
    filename: str,
    min_examples: int = 2,
    max_examples: int = 200_000,
    max_chars: int = 20_000,
    max_references: int = 64,
) -> ParsedDataset:
    """Validate an uploaded file and return its records; raise a ``DomainError`` on the first fault."""
    fmt = _format_from_filename(filename)
    text = _decode(data)
    limits = _Limits(min_examples, max_examples, max_chars, max_references)
    if fmt == "jsonl":
        shape, rows = None, _jsonl_rows(text)
    else:
        shape, rows = _csv_rows(text, max_chars)
    shape, records = _collect(rows, shape, limits)
    labels = _check_labels(records) if shape.kind == DatasetKind.CLASSIFICATION else None
    return ParsedDataset(
        format=fmt, kind=shape.kind, records=records, labels=labels, sha256=hashlib.sha256(data).hexdigest()
    )


# --- file level -------------------------------------------------------------------------------------------


def _format_from_filename(filename: str) -> str:
    # Only the last path component counts, whichever separator a client's OS uses.
    name = re.split(r"[\\/]", filename or "")[-1]
    ext = name.rpartition(".")[2].lower() if "." in name else ""
    if ext in ACCEPTED_EXTENSIONS:
        return ext
    shown = f'".{ext[:20]}"' if ext else "no extension"
    raise UnsupportedMediaType(
        f"Unsupported file type: {shown}; upload a .jsonl or .csv file.", code="unsupported_format"
    )


def _decode(data: bytes) -> str:
    if not data:
        raise DatasetInvalid("The file is empty.", code="empty_file")
    _reject_binary(data)
    body = data[len(_BOM) :] if data.startswith(_BOM) else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = _line_of_offset(body, exc.start)
        raise DatasetInvalid(
            f"The file is not UTF-8 text: invalid byte 0x{body[exc.start]:02x} on line {line}; "
            "save it as UTF-8.",
            line=line,
            code="not_utf8",
        ) from None
    if not text.strip():
        raise DatasetInvalid("The file is empty (only white space).", code="empty_file")
    return text


def _reject_binary(data: bytes) -> None:
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise DatasetInvalid(
                f"The file is {encoding} text, not UTF-8; save it as UTF-8.", line=1, code="not_utf8"
            )
    for magic, kind in _MAGIC_NUMBERS:
        if data.startswith(magic):
            raise DatasetInvalid(
                f"The file is a {kind} file, not a text dataset; upload the .jsonl or "
                ".csv itself, uncompressed.",
                code="binary_file",
            )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = _line_of_offset(data, nul)
        raise DatasetInvalid(
            f"The file contains binary data (a NUL byte on line {line}), not text.",
            line=line,
            code="binary_file",
        )


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


# --- JSONL ------------------------------------------------------------------------------------------------


def _jsonl_rows(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON allows raw
    # inside strings. A trailing "\r" (CRLF) is white space to json.loads.
    for index, raw in enumerate(text.split("\n")):
        if not raw.strip():
            continue
        line = index + 1
        value = _load_json_line(raw, line)
        if not isinstance(value, dict):
            raise DatasetInvalid(
                f"Line {line} is a JSON {_json_type(value)}, not an object; each line must be one record "
                f"such as {_SHAPES_TEXT}.",
                line=line,
                code="not_an_object",
            )
        yield line, value


def _load_json_line(raw: str, line: int) -> Any:
    try:
        return parse_json(raw)
    except JsonFault as fault:
        message = f"Line {line} is not valid JSON: {fault}."
        raise DatasetInvalid(message, line=line, code="invalid_json") from None


# --- CSV --------------------------------------------------------------------------------------------------


def _csv_rows(text: str, max_chars: int) -> tuple[_Shape, Iterator[tuple[int, dict[str, str]]]]:
    # CRLF -> LF first, so quoted multi-line cells don't keep a stray "\r" from a Windows export.
    reader = csv.reader(io.StringIO(text.replace("\r\n", "\n"), newline=""), strict=True)
    _raise_field_limit()
    header = _next_csv_row(reader, 0, max_chars)
    if header is None:  # unreachable after the empty-file check, but keeps the types honest
        raise DatasetInvalid("The file is empty.", code="empty_file")
    header_line, cells = header
    shape, columns = _csv_shape(cells, header_line)
    return shape, _csv_body(reader, header_line, len(cells), shape, columns, max_chars)


def _raise_field_limit() -> None:
    # The csv module refuses cells over a process-wide limit (128 KiB by default) without saying which
    # column; lift it so a long cell reaches our own example_too_long check, which names the field. The
    # whole file is in memory already, so this bounds nothing useful. Always the same value: concurrent
    # uploads setting it cannot race each other into a lower limit.
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)


def _next_csv_row(reader: Any, last_line: int, max_chars: int) -> tuple[int, list[str]] | None:
    """The next non-blank row and the physical line it starts on, or None at the end."""
    while True:
        start = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            _raise_csv_error(exc, start, max_chars)
        if row:
            return start, row
        last_line = reader.line_num


def _raise_csv_error(exc: csv.Error, line: int, max_chars: int) -> NoReturn:
    if "field larger than field limit" in str(exc):
        raise DatasetInvalid(
            f"Line {line} has a cell over {max_chars} characters.", line=line, code="example_too_long"
        ) from None
    raise DatasetInvalid(
        f"Line {line} is not valid CSV: {exc}; quote cells that contain commas, quotes or "
        'line breaks, doubling any quote inside ("").',
        line=line,
        code="invalid_csv",
    ) from None


def _csv_shape(cells: list[str], line: int) -> tuple[_Shape, tuple[int, int]]:
    names = [cell.strip().lower() for cell in cells]
    for shape in _SHAPES:
        if shape.kind == DatasetKind.REFERENCES and all(field in names for field in shape.fields):
            raise DatasetInvalid(
                f'The header on line {line} names a "references" column, but a CSV cell holds one text, '
                'not a list: upload {"input", "references": [...]} records as a .jsonl file.',
                line=line,
                param="references",
                code="references_need_jsonl",
            )
        if all(field in names for field in shape.fields):
            return shape, (
                _csv_column(names, shape.input_field, line),
                _csv_column(names, shape.output_field, line),
            )
    partial = [shape for shape in _SHAPES if any(field in names for field in shape.fields)]
    if partial:
        missing = next(field for field in partial[0].fields if field not in names)
        raise DatasetInvalid(
            f'The header on line {line} has no "{missing}" column; accepted column pairs are {_SHAPES_TEXT}.',
            line=line,
            param=missing,
            code="missing_field",
        )
    shown = ", ".join(cells[:10])[:200]
    raise DatasetInvalid(
        f"The first row (line {line}) must name the columns of one of {_SHAPES_TEXT}; found: {shown}.",
        line=line,
        code="csv_no_header",
    )


def _csv_column(names: list[str], field: str, line: int) -> int:
    if names.count(field) > 1:
        raise DatasetInvalid(
            f'The header on line {line} names the "{field}" column more than once.',
            line=line,
            param=field,
            code="csv_duplicate_column",
        )
    return names.index(field)


def _csv_body(
    reader: Any, header_line: int, width: int, shape: _Shape, columns: tuple[int, int], max_chars: int
) -> Iterator[tuple[int, dict[str, str]]]:
    last_line = reader.line_num
    while (row := _next_csv_row(reader, last_line, max_chars)) is not None:
        line, cells = row
        last_line = reader.line_num
        if len(cells) != width:
            raise DatasetInvalid(
                f"Line {line} has {len(cells)} cells but the header (line {header_line}) has {width}; quote "
                "cells that contain commas.",
                line=line,
                code="csv_column_count",
            )
        yield line, {shape.input_field: cells[columns[0]], shape.output_field: cells[columns[1]]}


# --- records ----------------------------------------------------------------------------------------------


def _collect(
    rows: Iterator[tuple[int, dict[str, Any]]], shape: _Shape | None, limits: _Limits
) -> tuple[_Shape, list[tuple[str, str]]]:
    records: list[tuple[str, str]] = []
    first_line = 0
    for line, obj in rows:
        if shape is None:
            shape, first_line = _shape_of_first(obj, line), line
        elif not (shape.input_field in obj and shape.output_field in obj):
            _raise_shape_mismatch(obj, line, shape, first_line)
        if len(records) >= limits.max_examples:
            raise PayloadTooLarge(
                f"The dataset has more than {limits.max_examples} examples (line {line} is example "
                f"{limits.max_examples + 1}); split it or sample it.",
                line=line,
                code="too_many_examples",
            )
        records.append(_extract(obj, line, shape, limits))
    if shape is None or len(records) < limits.min_examples:
        raise DatasetInvalid(
            f"The dataset has {len(records)} examples; at least {limits.min_examples} are needed.",
            code="too_few_examples",
        )
    return shape, records


def _shape_of_first(obj: dict[str, Any], line: int) -> _Shape:
    for shape in _SHAPES:
        if shape.input_field in obj and shape.output_field in obj:
            return shape
    partial = next((s for s in _SHAPES if s.input_field in obj or s.output_field in obj), None)
    missing = None if partial is None else next(f for f in partial.fields if f not in obj)
    what = "has no accepted fields" if missing is None else f'has no "{missing}" field'
    raise DatasetInvalid(
        f"Line {line} {what}; accepted records are {_SHAPES_TEXT}.",
        line=line,
        param=missing,
        code="missing_field",
    )


def _raise_shape_mismatch(obj: dict[str, Any], line: int, shape: _Shape, first_line: int) -> NoReturn:
    other = next((s for s in _SHAPES if s.input_field in obj and s.output_field in obj), None)
    if other is not None:
        raise DatasetInvalid(
            f"Line {line} is a {other.describe()} record but line {first_line} is {shape.describe()}; all "
            "records must have the same shape.",
            line=line,
            code="mixed_shapes",
        )
    missing = next(field for field in shape.fields if field not in obj)
    raise DatasetInvalid(
        f'Line {line} has no "{missing}" field; like line {first_line}, every record needs '
        f"{shape.describe()}.",
        line=line,
        param=missing,
        code="missing_field",
    )


def _extract(obj: dict[str, Any], line: int, shape: _Shape, limits: _Limits) -> Record:
    max_chars = limits.max_chars
    source = _text_field(obj[shape.input_field], shape.input_field, line, max_chars)
    output = obj[shape.output_field]
    if shape.kind == DatasetKind.CLASSIFICATION:
        return source, _label_field(output, shape.output_field, line, max_chars)
    if shape.kind == DatasetKind.REFERENCES:
        return source, _references_field(output, shape.output_field, line, limits)
    return source, _text_field(output, shape.output_field, line, max_chars)


def _references_field(value: Any, field: str, line: int, limits: _Limits) -> list[str]:
    if not isinstance(value, list) or not value:
        what = "an empty array" if isinstance(value, list) else _json_type(value)
        raise DatasetInvalid(
            f'Line {line}: "{field}" must be a non-empty array of strings, not {what}.',
            line=line,
            param=field,
            code="wrong_type",
        )
    if len(value) > limits.max_references:
        raise DatasetInvalid(
            f'Line {line}: "{field}" has {len(value)} references; the limit is {limits.max_references} '
            "(SOFTPROMPT_MAX_REFERENCES).",
            line=line,
            param=field,
            code="too_many_references",
        )
    return [
        _text_field(reference, f"{field}[{i}]", line, limits.max_chars) for i, reference in enumerate(value)
    ]


def _text_field(value: Any, field: str, line: int, max_chars: int) -> str:
    if not isinstance(value, str):
        raise DatasetInvalid(
            f'Line {line}: "{field}" must be a string, not {_json_type(value)}.',
            line=line,
            param=field,
            code="wrong_type",
        )
    return _checked_text(value, field, line, max_chars)


def _label_field(value: Any, field: str, line: int, max_chars: int) -> str:
    # bool is a subclass of int, so it must be refused before the int case.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DatasetInvalid(
            f'Line {line}: "{field}" must be a string (or an integer), not {_json_type(value)}.',
            line=line,
            param=field,
            code="wrong_type",
        )
    return _checked_text(str(value).strip(), field, line, max_chars)


def _checked_text(value: str, field: str, line: int, max_chars: int) -> str:
    check_text(value, param=field, line=line)
    if not value.strip():
        raise DatasetInvalid(f'Line {line}: "{field}" is empty.', line=line, param=field, code="empty_field")
    if len(value) > max_chars:
        raise DatasetInvalid(
            f'Line {line}: "{field}" has {len(value)} characters; the limit is {max_chars}.',
            line=line,
            param=field,
            code="example_too_long",
        )
    return value


def _check_labels(records: list[Record]) -> list[str]:
    labels = sorted({label for _, label in records})
    if len(labels) < 2:
        raise DatasetInvalid(
            f'Every example has the label "{labels[0]}"; classification needs at least two distinct labels.',
            param="label",
            code="single_label",
        )
    return labels


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


# --- what the registry keeps -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedUpload:
    """A valid upload as the registry stores it, computed wherever the parsing runs (a process of its own
    for a large file): the records come back already encoded, one bytes object, not a Python object each."""

    format: str
    kind: str
    num_examples: int
    labels: list[str] | None
    sha256: str
    records: bytes  # JSON lines of [input, output], compressed (encode_records)
    stats: dict[str, Any]  # without token counts: the tokenizer lives in the caller's process
    token_sample: list[Record]  # the records token_stats() counts


def parse_upload(
    data: bytes, *, filename: str, min_examples: int, max_examples: int, max_references: int
) -> ParsedUpload:
    parsed = parse_dataset(
        data,
        filename=filename,
        min_examples=min_examples,
        max_examples=max_examples,
        max_references=max_references,
    )
    return ParsedUpload(
        format=parsed.format,
        kind=parsed.kind,
        num_examples=len(parsed.records),
        labels=parsed.labels,
        sha256=parsed.sha256,
        records=encode_records(parsed.records),
        stats=dataset_stats(parsed, None),
        token_sample=parsed.records[:TOKEN_STATS_SAMPLE],
    )


# zlib's fastest level: text records shrink about 2.5x (SST-2's training split: 4.7 MB to 1.8 MB, 50 ms; level
# 6 gains a fifth more for four times the time). What an upload stores is copied whole, with the interpreter
# lock held, as it is handed to the database: a 50 MB blob held the API's other requests up to 0.1 s.
RECORDS_ZLIB_LEVEL = 1


def encode_records(records: list[Record]) -> bytes:
    """JSON lines of [input, output], compressed."""
    lines = "\n".join(json.dumps(list(pair), ensure_ascii=False) for pair in records).encode()
    return zlib.compress(lines, RECORDS_ZLIB_LEVEL)


def decode_records(data: bytes) -> list[Record]:
    # Datasets stored before records were compressed hold the JSON lines as they are; a line opens with "[".
    lines = data if data.startswith(b"[") else zlib.decompress(data)
    return [tuple(json.loads(line)) for line in lines.decode().split("\n")]


# --- statistics -------------------------------------------------------------------------------------------


def dataset_stats(parsed: ParsedDataset, count_tokens: Callable[[str], int] | None) -> dict[str, Any]:
    """Summary stored with the dataset. Token statistics cover at most the first ``TOKEN_STATS_SAMPLE``
    records (``token_stats_sample`` says how many) so a large upload is not tokenised in full here."""
    inputs = [source for source, _ in parsed.records]
    outputs = [text for record in parsed.records for text in outputs_of(record)]
    stats: dict[str, Any] = {
        "num_examples": len(parsed.records),
        "label_counts": dict(sorted(Counter(outputs).items()))
        if parsed.kind == DatasetKind.CLASSIFICATION
        else None,
        "input_chars": _summary([len(s) for s in inputs]),
        "output_chars": _summary([len(s) for s in outputs]),
        "input_tokens": None,
        "output_tokens": None,
        "token_stats_sample": None,
    }
    if count_tokens is not None:
        stats.update(token_stats(parsed.records[:TOKEN_STATS_SAMPLE], count_tokens))
    return stats


def token_stats(sample: list[Record], count_tokens: Callable[[str], int]) -> dict[str, Any]:
    return {
        "input_tokens": _summary([count_tokens(s) for s, _ in sample], with_p95=True),
        "output_tokens": _summary(
            [count_tokens(t) for record in sample for t in outputs_of(record)], with_p95=True
        ),
        "token_stats_sample": len(sample),
    }


def _summary(values: list[int], *, with_p95: bool = False) -> dict[str, float | int]:
    if not values:
        result: dict[str, float | int] = {"min": 0, "mean": 0.0, "max": 0}
        return {**result, "p95": 0} if with_p95 else result
    result = {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}
    if with_p95:
        # Nearest-rank percentile: always a value that occurs in the data.
        result["p95"] = sorted(values)[math.ceil(0.95 * len(values)) - 1]
    return result
