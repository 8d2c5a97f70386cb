"""Every text field of the OpenAPI schema, fuzzed with arbitrary Unicode: NUL, lone UTF-16 surrogates,
non-characters and everything else hypothesis draws. Path and query parameters, JSON body fields at any
depth, form fields and upload file names each get the text in an otherwise ordinary request; no answer may
be a server error (5xx), on either database. The rule is app/input_text.py's, applied at the edge."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.helpers import adapter_zip, sentiment_file, upload

EXAMPLES_PER_FIELD = 12
AWKWARD = ["\x00", "\ud800", "\udfff", "a\x00b", "x\ud83dy", "\ufffe", "\U0010ffff", "", " ", "é" * 300]
TEXT = st.one_of(st.sampled_from(AWKWARD), st.text(st.characters(exclude_categories=()), max_size=40))
# Values a request needs to get past the first checks, by field name; other fields get a plain value.
KNOWN = {
    "task": "sst2",
    "model": "tiny",
    "input": "a fine film",
    "prompt": "a fine film",
    "template": "Review: {input}\nSentiment:",
    "labels": ["negative", "positive"],
    "messages": [{"role": "user", "content": "a fine film"}],
    "training_file": "file-1",
    "purpose": "fine-tune",
    "role": "user",
}


@dataclass(frozen=True)
class Field:
    method: str
    path: str
    where: str  # "path", "query", "json" or "form"
    name: tuple[str | int, ...]  # the field's place: a parameter's name, or the keys down a body
    operation: dict

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path} {self.where}:{'.'.join(map(str, self.name))}"


def text_fields(spec: dict) -> list[Field]:
    fields = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] in ("path", "query") and _accepts_text(spec, parameter["schema"]):
                    fields.append(Field(method, path, parameter["in"], (parameter["name"],), operation))
            content = operation.get("requestBody", {}).get("content", {})
            for media, where in (("application/json", "json"), ("multipart/form-data", "form")):
                if media in content:
                    for place in _string_leaves(spec, content[media]["schema"], ()):
                        fields.append(Field(method, path, where, place, operation))
    return fields


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _branches(spec: dict, schema: dict) -> list[dict]:
    schema = _resolve(spec, schema)
    return [_resolve(spec, s) for s in schema.get("anyOf", schema.get("oneOf", [schema]))]


def _accepts_text(spec: dict, schema: dict) -> bool:
    return any(b.get("type") == "string" and "enum" not in b for b in _branches(spec, schema))


def _string_leaves(spec: dict, schema: dict, place: tuple) -> list[tuple]:
    """Places in a body where a string goes (list items at index 0); a binary field's place stands for
    its file name."""
    leaves = []
    for branch in _branches(spec, schema):
        if branch.get("type") == "string" and "enum" not in branch and "const" not in branch:
            leaves.append(place)
        elif branch.get("type") == "array":
            leaves += _string_leaves(spec, branch.get("items", {}), (*place, 0))
        elif branch.get("type") == "object":
            for name, child in branch.get("properties", {}).items():
                leaves += _string_leaves(spec, child, (*place, name))
    return list(dict.fromkeys(leaves))


def example(spec: dict, schema: dict, name: str | int | None) -> Any:
    """An ordinary value for ``schema``: required object fields filled in, optional ones left out."""
    if name in KNOWN:
        return KNOWN[name]
    branches = [b for b in _branches(spec, schema) if b.get("type") != "null"] or [{}]
    branch = branches[0]
    if "const" in branch:
        return branch["const"]
    if "enum" in branch:
        return branch["enum"][0]
    kind = branch.get("type")
    if kind == "object":
        required = branch.get("required", [])
        return {k: example(spec, v, k) for k, v in branch.get("properties", {}).items() if k in required}
    if kind == "array":
        return [example(spec, branch.get("items", {}), None)]
    return {"integer": 1, "number": 1.0, "boolean": False, "string": "x"}.get(kind, "x")


def _with(value: Any, place: tuple, text: str) -> Any:
    """``value`` with ``text`` put at ``place``, creating the containers on the way."""
    if not place:
        return text
    head, rest = place[0], place[1:]
    if isinstance(head, int):
        items = list(value) if isinstance(value, list) and value else [None]
        items[0] = _with(items[0], rest, text)
        return items
    container = dict(value) if isinstance(value, dict) else {}
    container[head] = _with(container.get(head), rest, text)
    return container


def send(client: httpx.Client, spec: dict, field: Field, text: str) -> httpx.Response:
    operation, path = field.operation, field.path
    params: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        value = text if field.where in ("path", "query") and parameter["name"] == field.name[0] else None
        if value is None and not parameter.get("required"):
            continue
        value = value if value is not None else str(example(spec, parameter["schema"], parameter["name"]))
        if parameter["in"] == "path":
            # Bytes as they would come over the wire: a lone surrogate can only arrive as invalid UTF-8.
            encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
            path = path.replace("{" + parameter["name"] + "}", encoded)
        elif parameter["in"] == "query":
            params[parameter["name"]] = value
    url = path + (
        "?" + "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'))}" for k, v in params.items())
        if params
        else ""
    )
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        body = example(spec, content["application/json"]["schema"], None)
        if field.where == "json":
            body = _with(body, field.name, text)
        # json.dumps writes a lone surrogate as the "\ud800" escape any client can send.
        return client.request(
            field.method, url, content=json.dumps(body), headers={"Content-Type": "application/json"}
        )
    if "multipart/form-data" in content:
        return _send_form(client, spec, field, url, content["multipart/form-data"]["schema"], text)
    return client.request(field.method, url)


def _send_form(client, spec, field: Field, url: str, schema: dict, text: str) -> httpx.Response:
    form = _resolve(spec, schema)
    data, files = {}, {}
    for name, child in form.get("properties", {}).items():
        fuzzed = field.where == "form" and field.name[0] == name
        if _resolve(spec, child).get("format") == "binary" or _resolve(spec, child).get("contentMediaType"):
            content = adapter_zip() if "prompts" in field.path else sentiment_file()
            filename = text if fuzzed else ("a.zip" if "prompts" in field.path else "train.jsonl")
            files[name] = (filename, content)
        elif fuzzed:
            data[name] = text.encode("utf-8", "surrogatepass")
        elif name in form.get("required", []) or name in KNOWN:
            value = example(spec, child, name)
            data[name] = value if isinstance(value, str) else json.dumps(value)
    return client.request(field.method, url, data=data, files=files)


@pytest.fixture
def fields(client, trained) -> list[Field]:
    upload(client, sentiment_file())  # something to find: dataset (file) 2 beside the trained task's
    return text_fields(client.get("/openapi.json").json())


def _fuzzer(client, spec: dict, field: Field, checked: dict[str, int]):
    @given(text=TEXT)
    @settings(
        max_examples=EXAMPLES_PER_FIELD,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run: a failure in CI reproduces here
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(text: str) -> None:
        try:
            response = send(client, spec, field, text)
        except (UnicodeEncodeError, httpx.InvalidURL, httpx.LocalProtocolError):
            assume(False)  # the client itself cannot send this (a file name with a surrogate)
        checked[str(field)] = checked.get(str(field), 0) + 1
        assert response.status_code < 500, f"{field} with {text!r}: {response.status_code} {response.text}"

    return fuzz


def test_no_text_in_any_field_gets_a_server_error(client, fields):
    spec = client.get("/openapi.json").json()
    checked: dict[str, int] = {}
    for field in fields:
        _fuzzer(client, spec, field, checked)()
    print(f"text fuzzing: {sum(checked.values())} requests over {len(checked)} text fields")
    assert len(checked) >= 40
