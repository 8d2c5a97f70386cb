"""An imported adapter zip is read with a running count of the bytes really inflated, a chunk at a time,
and only with the compression methods adapters use: the sizes in a zip's headers are the sender's word."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile

import pytest

from app.errors import InvalidRequest
from app.ml.peft_format import CONFIG_FILE, _read_zip

MiB = 1024 * 1024


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _claiming(data: bytes, size: int) -> bytes:
    """The zip with its one member's uncompressed size rewritten, in the local header and the central
    directory, to ``size``: what a zip bomb claims."""
    data = bytearray(data)
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, size)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, size)
    return bytes(data)


def test_a_member_that_claims_little_and_inflates_to_much_is_stopped_without_inflating_it():
    bomb = _claiming(_zip({CONFIG_FILE: bytes(200 * MiB)}), 100)
    assert len(bomb) < 300_000  # 200 MiB of zeros deflate to about 200 KB
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest) as refused:
            _read_zip(bomb, 64 * MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "cannot be read" in refused.value.message and refused.value.code == "invalid_adapter"
    assert peak < 8 * MiB, peak


def test_members_past_the_cap_together_are_refused_as_they_inflate():
    honest = _zip({CONFIG_FILE: bytes(3 * MiB), "adapter_model.safetensors": bytes(3 * MiB)})
    assert set(_read_zip(honest, 6 * MiB)) == {CONFIG_FILE, "adapter_model.safetensors"}
    with pytest.raises(InvalidRequest) as refused:
        _read_zip(honest, 5 * MiB)
    assert f"more than {5 * MiB} bytes" in refused.value.message


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_bzip2_and_lzma_members_are_refused_before_they_are_inflated(method):
    # bzip2 packs 1 GiB of zeros into about 1 KB, and its decompressor returns a whole block per read.
    archive = _zip({CONFIG_FILE: json.dumps({"peft_type": "PROMPT_TUNING"}).encode()}, compression=method)
    with pytest.raises(InvalidRequest) as refused:
        _read_zip(archive, 64 * MiB)
    assert f"compressed with method {method}" in refused.value.message
    assert "only stored and deflate" in refused.value.message


def test_files_an_adapter_does_not_need_are_never_inflated():
    archive = _claiming(_zip({"notes/big.txt": bytes(50 * MiB)}), 10)
    assert _read_zip(archive, 64 * MiB) == {}
