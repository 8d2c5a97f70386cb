"""Every request gets an id: the caller's `X-Request-ID` when it is a sensible one, else a new one. It is
sent back in the same header and written on every log line the request causes, including the one access
line per request logged here (uvicorn's own access log is off: it cannot know the id)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs

log = logging.getLogger("softprompt.access")
HEADER = b"x-request-id"
# An id from outside goes into logs: short and plain, or it is replaced.
SENSIBLE = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class RequestId:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        value = given.decode() if SENSIBLE.fullmatch(given) else uuid.uuid4().hex
        token = logs.request_id.set(value)
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, value.encode())]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The path only, never the query string or headers: nothing secret reaches the log.
            milliseconds = (time.perf_counter() - started) * 1000
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, milliseconds)
            logs.request_id.reset(token)
