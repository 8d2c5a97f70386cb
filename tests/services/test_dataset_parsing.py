"""Upload validation: every stable error code with its line and field, the accepted shapes in both formats,
and the statistics stored with a dataset."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zipfile

import pytest

from app.errors import DatasetInvalid, DomainError, PayloadTooLarge, UnsupportedMediaType
from app.services.datasets.parsing import (
    ParsedDataset,
    dataset_stats,
    decode_records,
    encode_records,
    parse_dataset,
)
from tests.paths import SST2_TRAIN


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


CLASSIFICATION = jsonl({"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"})


def fails(data: bytes, filename: str = "d.jsonl", **limits: int) -> DomainError:
    with pytest.raises(DomainError) as info:
        parse_dataset(data, filename=filename, **limits)
    return info.value


def assert_fault(
    err: DomainError, code: str, *, line: int | None = None, param: str | None = None, status: int = 422
) -> None:
    assert (err.code, err.line, err.param, err.status) == (code, line, param, status), err.message
    assert err.message


# --- accepted shapes ----------------------------------------------------------------------------------------


def test_jsonl_classification() -> None:
    parsed = parse_dataset(CLASSIFICATION, filename="train.jsonl")
    assert parsed == ParsedDataset(
        format="jsonl",
        kind="classification",
        records=[("good film", "pos"), ("bad film", "neg")],
        labels=["neg", "pos"],
        sha256=hashlib.sha256(CLASSIFICATION).hexdigest(),
    )


@pytest.mark.parametrize("fields", [("input", "output"), ("prompt", "completion")])
def test_jsonl_generation_shapes(fields: tuple[str, str]) -> None:
    a, b = fields
    parsed = parse_dataset(jsonl({a: "2+2", b: "4"}, {a: "3+3", b: " 6\n"}), filename="x.JSONL")
    assert (parsed.format, parsed.kind, parsed.labels) == ("jsonl", "generation", None)
    assert parsed.records == [("2+2", "4"), ("3+3", " 6\n")]  # generation text is kept verbatim


@pytest.mark.parametrize(
    ("header", "kind"),
    [("text,label", "classification"), ("input,output", "generation"), ("prompt,completion", "generation")],
)
def test_csv_shapes(header: str, kind: str) -> None:
    parsed = parse_dataset(f"{header}\nhello,a\nworld,b\n".encode(), filename="d.Csv")
    assert (parsed.format, parsed.kind) == ("csv", kind)
    assert parsed.records == [("hello", "a"), ("world", "b")]
    assert parsed.labels == (["a", "b"] if kind == "classification" else None)


def test_csv_header_case_and_column_order_and_extra_columns() -> None:
    parsed = parse_dataset(b"id, Label ,TEXT\n1,pos,nice\n2,neg,awful\n", filename="d.csv")
    assert parsed.records == [("nice", "pos"), ("awful", "neg")]


def test_csv_quoted_cells_with_commas_quotes_and_newlines() -> None:
    data = b'text,label\n"hello, world",pos\n"two\nlines ""quoted""",neg\n'
    assert parse_dataset(data, filename="d.csv").records == [
        ("hello, world", "pos"),
        ('two\nlines "quoted"', "neg"),
    ]


def test_bom_and_crlf_accepted_in_jsonl() -> None:
    data = b"\xef\xbb\xbf" + CLASSIFICATION.replace(b"\n", b"\r\n")
    parsed = parse_dataset(data, filename="d.jsonl")
    assert parsed.records == [("good film", "pos"), ("bad film", "neg")]
    assert parsed.sha256 == hashlib.sha256(data).hexdigest()  # of the raw bytes, BOM included


def test_bom_and_crlf_accepted_in_csv_including_inside_quoted_cells() -> None:
    data = b'\xef\xbb\xbftext,label\r\n"a\r\nb",pos\r\nc,neg\r\n'
    assert parse_dataset(data, filename="d.csv").records == [("a\nb", "pos"), ("c", "neg")]


def test_int_labels_become_strings_and_labels_are_stripped() -> None:
    parsed = parse_dataset(
        jsonl({"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": " 1 "}),
        filename="d.jsonl",
    )
    assert parsed.records == [("a", "1"), ("b", "0"), ("c", "1")]
    assert parsed.labels == ["0", "1"]


def test_extra_keys_are_ignored() -> None:
    parsed = parse_dataset(
        jsonl(
            {"id": 7, "text": "a", "label": "x", "meta": {"k": None}},
            {"text": "b", "label": "y", "score": 0.5},
        ),
        filename="d.jsonl",
    )
    assert parsed.records == [("a", "x"), ("b", "y")]


def test_blank_lines_are_skipped_but_counted() -> None:
    data = b'\n  \n{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n\n{"text": 3, "label": "y"}\n'
    assert_fault(fails(data), "wrong_type", line=7, param="text")
    assert len(parse_dataset(data.rsplit(b"\n\n", 1)[0], filename="d.jsonl").records) == 2


def test_unicode_line_separator_inside_a_json_string_is_not_a_line_break() -> None:
    data = jsonl({"input": "a\u2028b", "output": "c"}, {"input": "d", "output": "e"})
    data = data.replace(b"\\u2028", "\u2028".encode())
    assert parse_dataset(data, filename="d.jsonl").records[0] == ("a\u2028b", "c")


# --- file-level faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["data.json", "data.txt", "data", "../../etc/passwd", "a.jsonl.gz"])
def test_unsupported_format(filename: str) -> None:
    err = fails(CLASSIFICATION, filename)
    assert isinstance(err, UnsupportedMediaType)
    assert_fault(err, "unsupported_format", status=415)
    assert ".jsonl" in err.message and ".csv" in err.message


def test_unsupported_format_names_the_extension() -> None:
    assert '".json"' in fails(CLASSIFICATION, "data.json").message
    assert "no extension" in fails(CLASSIFICATION, "data").message


def test_path_in_filename_only_contributes_its_extension() -> None:
    assert parse_dataset(CLASSIFICATION, filename="..\\..\\evil/train.jsonl").format == "jsonl"


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n", b"\xef\xbb\xbf"])
def test_empty_file(data: bytes) -> None:
    assert_fault(fails(data), "empty_file")


def test_not_utf8_gives_the_line_of_the_bad_byte() -> None:
    data = CLASSIFICATION + '{"text": "caf\u00e9", "label": "x"}\n'.encode("latin-1")
    assert_fault(fails(data), "not_utf8", line=3)
    assert "0xe9" in fails(data).message


def test_utf16_is_reported_as_not_utf8() -> None:
    assert_fault(fails(CLASSIFICATION.decode().encode("utf-16")), "not_utf8", line=1)


# Both archives carry a fixed time: the suite's processes each collect the tests, and must build the same
# bytes (and so the same test ids) even when their clocks read different seconds.
def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zipped(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("train.jsonl", date_time=(2026, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("blob", "kind"),
    [
        pytest.param(gz(CLASSIFICATION), "gzip", id="gzip"),
        pytest.param(zipped(CLASSIFICATION), "zip", id="zip"),
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00", "PNG", id="PNG"),
    ],
)
def test_compressed_or_binary_blob(blob: bytes, kind: str) -> None:
    err = fails(blob, "train.jsonl")
    assert_fault(err, "binary_file")
    assert kind in err.message


def test_nul_byte_is_binary_with_its_line() -> None:
    assert_fault(fails(CLASSIFICATION + b'{"text": "a\x00", "label": "x"}\n'), "binary_file", line=3)


# --- JSONL record faults ----------------------------------------------------------------------------------


def test_invalid_json_names_the_line_and_the_error() -> None:
    err = fails(CLASSIFICATION + b'{"text": "a", "label": }\n')
    assert_fault(err, "invalid_json", line=3)
    assert "column" in err.message


def test_deeply_nested_json_is_invalid_not_a_crash() -> None:
    assert_fault(fails(CLASSIFICATION + b"[" * 100_000 + b"\n"), "invalid_json", line=3)


@pytest.mark.parametrize("value", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_not_an_object(value: bytes) -> None:
    assert_fault(fails(CLASSIFICATION + value + b"\n"), "not_an_object", line=3)


def test_missing_field_on_a_later_line() -> None:
    err = fails(CLASSIFICATION + jsonl({"text": "no label"}))
    assert_fault(err, "missing_field", line=3, param="label")


def test_missing_field_on_the_first_record_names_the_accepted_shapes() -> None:
    err = fails(jsonl({"prompt": "p"}, {"prompt": "q", "completion": "c"}))
    assert_fault(err, "missing_field", line=1, param="completion")
    assert all(name in err.message for name in ("text", "label", "input", "output", "prompt", "completion"))


def test_first_record_with_no_known_fields() -> None:
    assert_fault(fails(jsonl({"question": "q", "answer": "a"})), "missing_field", line=1)


@pytest.mark.parametrize(
    ("record", "param"),
    [
        ({"text": 5, "label": "x"}, "text"),
        ({"text": "a", "label": None}, "label"),
        ({"text": "a", "label": 1.5}, "label"),
        ({"text": "a", "label": True}, "label"),
        ({"text": "a", "label": ["x"]}, "label"),
        ({"text": "a", "label": {"x": 1}}, "label"),
        ({"text": ["a"], "label": "x"}, "text"),
    ],
)
def test_wrong_type(record: dict[str, object], param: str) -> None:
    assert_fault(fails(CLASSIFICATION + jsonl(record)), "wrong_type", line=3, param=param)


def test_wrong_type_in_generation_output_refuses_numbers() -> None:
    err = fails(jsonl({"input": "2+2", "output": "4"}, {"input": "3+3", "output": 6}))
    assert_fault(err, "wrong_type", line=2, param="output")


@pytest.mark.parametrize(
    ("record", "param"),
    [
        ({"text": "", "label": "x"}, "text"),
        ({"text": "a", "label": "  "}, "label"),
        ({"text": " \n\t", "label": "x"}, "text"),
    ],
)
def test_empty_field(record: dict[str, object], param: str) -> None:
    assert_fault(fails(CLASSIFICATION + jsonl(record)), "empty_field", line=3, param=param)


def test_mixed_shapes() -> None:
    err = fails(b"\n" + CLASSIFICATION + jsonl({"input": "a", "output": "b"}))
    assert_fault(err, "mixed_shapes", line=4)
    assert "line 2" in err.message  # names the line whose shape set the rule


def test_too_few_examples() -> None:
    assert_fault(fails(jsonl({"text": "a", "label": "x"})), "too_few_examples")
    assert_fault(fails(CLASSIFICATION, min_examples=3), "too_few_examples")


def test_too_many_examples_stops_at_the_first_extra_line() -> None:
    err = fails(CLASSIFICATION + jsonl({"text": "c", "label": "pos"}, {"text": 1}), max_examples=2)
    assert isinstance(err, PayloadTooLarge)
    assert_fault(err, "too_many_examples", line=3, status=413)


def test_single_label() -> None:
    err = fails(jsonl({"text": "a", "label": "x"}, {"text": "b", "label": " x"}))
    assert_fault(err, "single_label", param="label")


def test_example_too_long() -> None:
    err = fails(CLASSIFICATION + jsonl({"text": "a" * 11, "label": "x"}), max_chars=10)
    assert_fault(err, "example_too_long", line=3, param="text")
    assert "11" in err.message and "10" in err.message
    err = fails(jsonl({"input": "a", "output": "b"}, {"input": "a", "output": "b" * 11}), max_chars=10)
    assert_fault(err, "example_too_long", line=2, param="output")


# --- CSV faults -------------------------------------------------------------------------------------------


def test_csv_no_header() -> None:
    assert_fault(fails(b"great movie,pos\nawful,neg\n", "d.csv"), "csv_no_header", line=1)


def test_csv_header_after_blank_lines_reports_its_line() -> None:
    assert_fault(fails(b"\n\nfoo,bar\n1,2\n", "d.csv"), "csv_no_header", line=3)


def test_csv_partial_header_names_the_missing_column() -> None:
    assert_fault(fails(b"text,category\na,b\nc,d\n", "d.csv"), "missing_field", line=1, param="label")


def test_csv_duplicate_column() -> None:
    assert_fault(fails(b"text,label,label\na,b,c\n", "d.csv"), "csv_duplicate_column", line=1, param="label")


def test_csv_column_count_reports_the_physical_line() -> None:
    data = b'text,label\n"multi\nline",pos\n\nhello, world,neg\n'
    assert_fault(fails(data, "d.csv"), "csv_column_count", line=5)


def test_csv_malformed_quoting() -> None:
    assert_fault(fails(b'text,label\na,pos\n"b"c,neg\n', "d.csv"), "invalid_csv", line=3)
    assert_fault(fails(b'text,label\na,pos\n"never closed,neg\n', "d.csv"), "invalid_csv", line=3)


def test_csv_record_faults_use_physical_lines() -> None:
    data = b'text,label\n"a\nb",pos\n"",neg\n'
    assert_fault(fails(data, "d.csv"), "empty_field", line=4, param="text")
    assert_fault(
        fails(b"text,label\na,pos\nb,neg\nc,pos\n", "d.csv", max_examples=2),
        "too_many_examples",
        line=4,
        status=413,
    )
    assert_fault(fails(b"text,label\na,pos\nb,pos\n", "d.csv"), "single_label", param="label")


def test_csv_cell_over_the_csv_module_limit_is_too_long() -> None:
    data = b"text,label\na,pos\n" + b"x" * 200_000 + b",neg\n"
    assert_fault(fails(data, "d.csv"), "example_too_long", line=3, param="text")


def test_errors_are_dataset_invalid() -> None:
    assert isinstance(fails(b""), DatasetInvalid)


# --- statistics -------------------------------------------------------------------------------------------


def test_stats_on_a_small_known_file() -> None:
    parsed = parse_dataset(
        jsonl(
            {"text": "ab", "label": "pos"},
            {"text": "abcd", "label": "neg"},
            {"text": "abcdef", "label": "pos"},
        ),
        filename="d.jsonl",
    )
    stats = dataset_stats(parsed, lambda s: len(s.split()) + len(s))
    assert stats == {
        "num_examples": 3,
        "label_counts": {"neg": 1, "pos": 2},
        "input_chars": {"min": 2, "mean": 4.0, "max": 6},
        "output_chars": {"min": 3, "mean": 3.0, "max": 3},
        "input_tokens": {"min": 3, "mean": 5.0, "max": 7, "p95": 7},
        "output_tokens": {"min": 4, "mean": 4.0, "max": 4, "p95": 4},
        "token_stats_sample": 3,
    }


def test_stats_without_a_tokenizer_and_for_generation() -> None:
    parsed = parse_dataset(
        jsonl({"input": "a", "output": "bb"}, {"input": "ccc", "output": "d"}), filename="d.jsonl"
    )
    stats = dataset_stats(parsed, None)
    assert stats["label_counts"] is None
    assert stats["input_tokens"] is None and stats["output_tokens"] is None
    assert stats["token_stats_sample"] is None
    assert stats["input_chars"] == {"min": 1, "mean": 2.0, "max": 3}


def test_token_stats_are_sampled_on_large_datasets() -> None:
    records = [(f"x{i}", "y") for i in range(5_000)]
    parsed = ParsedDataset(format="jsonl", kind="generation", records=records, labels=None, sha256="0")
    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return 1

    stats = dataset_stats(parsed, count)
    assert stats["token_stats_sample"] == 2_000 and len(calls) == 4_000
    assert stats["num_examples"] == 5_000


# --- real data and speed ----------------------------------------------------------------------------------


@pytest.mark.skipif(not SST2_TRAIN.exists(), reason=f"{SST2_TRAIN} not present")
def test_first_400_lines_of_sst2_train() -> None:
    with SST2_TRAIN.open("rb") as handle:
        data = b"".join(handle.readline() for _ in range(400))
    parsed = parse_dataset(data, filename=SST2_TRAIN.name)
    assert (parsed.format, parsed.kind) == ("jsonl", "classification")
    assert parsed.labels == ["negative", "positive"]
    assert len(parsed.records) == 400
    stats = dataset_stats(parsed, lambda s: len(s.split()))
    assert sum(stats["label_counts"].values()) == 400


def test_ten_megabytes_of_jsonl_parse_whole() -> None:
    """How fast: bench/uploads.py, which also times each malformed case through HTTP."""
    line = json.dumps({"text": "a fairly ordinary movie review of moderate length " * 2, "label": "pos"})
    other = line.replace('"pos"', '"neg"')
    count = 10_000_000 // (len(line) + 1)
    data = "\n".join(line if i % 2 else other for i in range(count)).encode()
    parsed = parse_dataset(data, filename="big.jsonl")
    assert len(parsed.records) == count and parsed.labels == ["neg", "pos"]


# --- several references per input (evaluation test sets) ---------------------------------------------------


def test_references_records_keep_every_reference() -> None:
    data = jsonl(
        {"input": "a | b", "references": ["A is b.", "b, said A"]}, {"input": "c", "references": ["C."]}
    )
    parsed = parse_dataset(data, filename="test.jsonl")
    assert (parsed.kind, parsed.labels) == ("references", None)
    assert parsed.records == [("a | b", ["A is b.", "b, said A"]), ("c", ["C."])]
    stats = dataset_stats(parsed, None)
    assert stats["output_chars"]["max"] == len("b, said A") and stats["label_counts"] is None


@pytest.mark.parametrize(
    ("references", "param", "code"),
    [
        ([], "references", "wrong_type"),
        ("one text", "references", "wrong_type"),
        (["fine", 3], "references[1]", "wrong_type"),
        (["fine", "  "], "references[1]", "empty_field"),
        (["r"] * 4, "references", "too_many_references"),
    ],
)
def test_bad_references_name_the_line_and_the_reference(references: object, param: str, code: str) -> None:
    data = jsonl({"input": "a", "references": ["x"]}, {"input": "b", "references": references})
    assert_fault(fails(data, max_references=3), code, line=2, param=param)


def test_references_mixed_with_outputs_are_mixed_shapes() -> None:
    data = jsonl({"input": "a", "output": "x"}, {"input": "b", "references": ["y"]})
    assert_fault(fails(data), "mixed_shapes", line=2)


def test_references_in_csv_say_to_use_jsonl() -> None:
    err = fails(b"input,references\na,x\nb,y\n", filename="d.csv")
    assert_fault(err, "references_need_jsonl", line=1, param="references")
    assert ".jsonl" in err.message


def test_stored_records_are_compressed_and_those_stored_plain_before_still_read() -> None:
    records = parse_dataset(SST2_TRAIN.read_bytes(), filename="train.jsonl").records[:2000]
    plain = "\n".join(json.dumps(list(pair), ensure_ascii=False) for pair in records).encode()
    stored = encode_records(records)
    assert len(stored) < len(plain) / 2
    assert decode_records(stored) == records
    assert decode_records(plain) == records  # a dataset uploaded before records were compressed
