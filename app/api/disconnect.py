"""A client that goes away stops its work. A stream notices by itself (sse-starlette ends its generator,
which cancels the rows); a JSON answer is awaited here beside the connection, and abandoned when the
connection closes first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request

from app.errors import ClientGone

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T], abandon: Callable[[], None]) -> T:
    """``work``'s result; if the client disconnects first, ``abandon()`` and ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            abandon()
    if not task.done() or task.cancelled():
        raise ClientGone("The client closed the connection; its work was stopped.")
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read whole, so the next message the server has for this request is its end.
    while (await request.receive())["type"] != "http.disconnect":
        pass
