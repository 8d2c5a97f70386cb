"""An uploaded dataset file on its way in: read once within its size limit and hashed on the way, then
parsed where it cannot hold up anyone else.

Parsing is Python work that holds the interpreter lock for seconds in all (a 50 MB file: about 3 s on
one core); in a thread of the API process it makes every other request, and the inference engine, wait
for its turns (/healthz took up to 0.3 s during a 50 MB upload so). A file over OWN_PROCESS_BYTES is
therefore written to a temporary file as it is read and parsed by a process of its own, which hands back
one bytes object of encoded records: this process never holds the file, or its records, as Python objects.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from app.errors import PayloadTooLarge, Unavailable
from app.services.datasets.parsing import ParsedUpload, parse_upload

OWN_PROCESS_BYTES = 1 << 20
READ_CHUNK = 1 << 20
PARSER_NICENESS = 10
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


@dataclass
class Upload:
    size: int
    sha256: str
    data: bytes | None = None  # a small file, in memory
    path: Path | None = None  # a large one, in a temporary file that close() removes
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if self.path is not None and not self._closed:
            self.path.unlink(missing_ok=True)
            self._closed = True


def receive(source: BinaryIO, *, limit: int) -> Upload:
    """Read ``source`` to its end, refusing it (413) once it passes ``limit`` bytes."""
    digest, size, chunks = hashlib.sha256(), 0, []
    spill: BinaryIO | None = None
    try:
        while chunk := source.read(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"The file is larger than the upload limit of {limit} bytes.",
                    param="file",
                    code="file_too_large",
                )
            digest.update(chunk)
            if spill is None and size > OWN_PROCESS_BYTES:
                spill = tempfile.NamedTemporaryFile(prefix="softprompt-upload-", delete=False)  # noqa: SIM115
                spill.writelines(chunks)
                chunks = []
            if spill is None:
                chunks.append(chunk)
            else:
                spill.write(chunk)
    except BaseException:
        if spill is not None:
            spill.close()
            os.unlink(spill.name)
        raise
    if spill is None:
        return Upload(size=size, sha256=digest.hexdigest(), data=b"".join(chunks))
    spill.close()
    return Upload(size=size, sha256=digest.hexdigest(), path=Path(spill.name))


def parse(
    upload: Upload, *, filename: str, min_examples: int, max_examples: int, max_references: int
) -> ParsedUpload:
    options = {
        "filename": filename,
        "min_examples": min_examples,
        "max_examples": max_examples,
        "max_references": max_references,
    }
    if upload.path is None:
        return parse_upload(upload.data, **options)
    pool = _parser_processes()
    try:
        return pool.submit(_parse_file, str(upload.path), **options).result()
    except BrokenProcessPool:  # the process died (out of memory, killed): the next upload gets a new one
        _forget(pool)
        raise Unavailable(
            "The upload could not be parsed: its parsing process stopped; retry shortly.",
            code="parser_unavailable",
            retry_after_s=5,
        ) from None


def _parse_file(path: str, **options) -> ParsedUpload:
    """In the parsing process."""
    return parse_upload(Path(path).read_bytes(), **options)


_parsers: ProcessPoolExecutor | None = None
_parsers_lock = threading.Lock()


def _parser_processes() -> ProcessPoolExecutor:
    """One process, started at the first large upload (spawned: a fork of a process running the engine's
    threads could inherit a lock held mid-operation); large uploads take turns in it."""
    global _parsers
    with _parsers_lock:
        if _parsers is None:
            _parsers = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_parser_started,
            )
        return _parsers


def _parser_started() -> None:
    """In the parsing process, first: background work, on a busy machine the API's own threads get the
    processor first; and it ends with the API process however that ends (killed, or by a signal its
    handlers re-raise), instead of living on."""
    os.nice(PARSER_NICENESS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def close_parsers() -> None:
    """Stop the parsing process, if one was started (the API's shutdown)."""
    global _parsers
    with _parsers_lock:
        pool, _parsers = _parsers, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _forget(pool: ProcessPoolExecutor) -> None:
    global _parsers
    with _parsers_lock:
        if _parsers is pool:
            _parsers = None
