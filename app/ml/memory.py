"""Handing freed memory back to the system.

glibc keeps freed blocks below its mmap threshold in the process's heap for reuse. The prompts' keys and
values are such blocks (about 15 KiB per layer on the default backbone), and a cache that turns over
thousands of them leaves the heap holding freed pages: the process's resident memory grows past what it
holds (by about 26 KiB per prompt version in bench/serving.py, more than half a prompt tensor).
`malloc_trim(0)` returns those pages. A no-op where the C library is not glibc.

glibc also gives each thread that allocates at once an arena of its own, up to eight per core, and a
block freed in one arena is reused only by the threads of that arena. A server's request threads each
decode prompts and read registry blobs, so each arena keeps its own freed pages: ``share_arenas`` caps
them at two, so what one thread frees another reuses."""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc(function: str):
    """The C library's ``function``, or None where the C library is another (musl, macOS) without it."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _libc("malloc_trim")
_MALLOPT = _libc("mallopt")
M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
SHARED_ARENAS = 2


def share_arenas() -> bool:
    """At most SHARED_ARENAS malloc arenas for the threads this process starts from now on; True when the
    C library took the setting."""
    return bool(_MALLOPT is not None and _MALLOPT(M_ARENA_MAX, SHARED_ARENAS))


def release_freed_memory() -> bool:
    """True when the C library was asked to return its free pages."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
