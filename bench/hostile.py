"""What a hostile tenant sends that is not one ordinary request, for bench/attacks.py: crafted archives and
tensors, and floods of connections (event streams, headers and bodies sent a byte at a time)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zipfile
from collections import Counter
from functools import cache

import httpx
import torch

from app.ml.soft_prompt import prompt_to_bytes

EMBEDDING_DIM = 576  # SmolLM2-135M
GIB = 1 << 30


def adapter_zip(
    labels: list[str] | None, template: str, prompt: torch.Tensor | None = None, config: bytes | None = None
) -> bytes:
    """A PEFT prompt-tuning adapter for the backbone (zeros unless ``prompt``), with our softprompt.json."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("adapter_config.json", config or json.dumps({"peft_type": "PROMPT_TUNING"}))
        tensor = prompt if prompt is not None else torch.zeros(20, EMBEDDING_DIM)
        archive.writestr("adapter_model.safetensors", prompt_to_bytes(tensor))
        archive.writestr("softprompt.json", json.dumps({"template": template, "labels": labels}))
    return buffer.getvalue()


@cache
def bzip2_bomb() -> bytes:
    """The hardening issue's bomb: an adapter_config.json that is a bzip2 member inflating to 1 GiB, whose
    headers claim 100 bytes (a reader that trusts them counts 100)."""
    return _claim_size(_zeros_member("adapter_config.json", zipfile.ZIP_BZIP2), 100)


@cache
def deflate_bomb(claimed: int = GIB) -> bytes:
    """A deflate member (a method the import reads) of 1 GiB of zeros, about 1 MB on the wire, whose
    headers claim ``claimed`` bytes."""
    return _claim_size(_zeros_member("adapter_model.safetensors", zipfile.ZIP_DEFLATED), claimed)


def _zeros_member(name: str, method: int) -> bytes:
    """A zip of one member, 1 GiB of zeros compressed with ``method``, written a piece at a time."""
    buffer = io.BytesIO()
    member = zipfile.ZipInfo(name)
    member.compress_type = method
    with zipfile.ZipFile(buffer, "w") as archive, archive.open(member, "w") as inflated:
        zeros = b"\0" * (1 << 24)
        for _ in range(GIB // len(zeros)):
            inflated.write(zeros)
    return buffer.getvalue()


def _claim_size(archive: bytes, claimed: int) -> bytes:
    """``archive`` with its one member's uncompressed size, in both headers, replaced by ``claimed``."""
    data = bytearray(archive)
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, claimed)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, claimed)
    return bytes(data)


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def extreme_prompt(value: float = 3e38) -> torch.Tensor:
    """Finite, and past any scale a backbone's own embeddings have."""
    return torch.full((20, EMBEDDING_DIM), value)


def loud_prompt(scale: float) -> torch.Tensor:
    """Random vectors ``scale`` times the size of the backbone's typical embedding (about 1 in norm per
    coordinate block); what an import just within the bounds may hold."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(20, EMBEDDING_DIM, generator=generator) * 0.05 * scale


async def event_streams(url: str, key: str, job_id: int, count: int, stop: asyncio.Event) -> Counter:
    """``count`` event streams of one job opened at once and held until ``stop``: their answers."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    answers: Counter = Counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:

        async def one() -> None:
            try:
                async with http.stream("GET", f"/v1/tuning/jobs/{job_id}/events") as response:
                    answers[str(response.status_code)] += 1
                    if response.status_code == 200:
                        async for _ in response.aiter_bytes():
                            if stop.is_set():
                                break
            except httpx.HTTPError as error:
                answers[type(error).__name__] += 1

        streams = [asyncio.create_task(one()) for _ in range(count)]
        await stop.wait()
        for stream in streams:
            stream.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    return answers


async def trickles(
    host: str, port: int, headers: int, bodies: int, stop: asyncio.Event
) -> tuple[Counter, dict[str, list[float]]]:
    """``headers`` connections sending a request's headers a byte a second, and ``bodies`` sending a 10 MB
    upload's body 100 bytes a second, until ``stop``: how each ended, and when the server ended those it
    ended (seconds after they opened)."""
    answers: Counter = Counter()
    ended_after: dict[str, list[float]] = {"headers": [], "body": []}
    head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"x" * 1000 + b"\r\n\r\n"
    upload = (
        b"POST /v1/datasets HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
    )

    async def trickle(kind: str, first: bytes, rest: bytes, chunk: int) -> None:
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as error:
            answers[f"{kind}: {type(error).__name__}"] += 1
            return
        try:
            writer.write(first)
            for start in range(0, len(rest), chunk):
                if stop.is_set():
                    break
                writer.write(rest[start : start + chunk])
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(200), timeout=1.0)
                except TimeoutError:
                    continue
                status = answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
                answers[f"{kind}: {status} from the server"] += 1
                ended_after[kind].append(time.monotonic() - started)
                return
            answers[f"{kind}: still open at the end"] += 1
        except (ConnectionError, OSError):
            answers[f"{kind}: closed by the server"] += 1
            ended_after[kind].append(time.monotonic() - started)
        finally:
            writer.close()

    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    body = part + b"x" * 10_000_000
    tasks = [asyncio.create_task(trickle("headers", b"", head, 1)) for _ in range(headers)]
    tasks += [asyncio.create_task(trickle("body", upload, body, 100)) for _ in range(bodies)]
    await asyncio.gather(*tasks)
    return answers, ended_after
