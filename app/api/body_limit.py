"""Request bodies are refused past their limit while they arrive, not after: a declared Content-Length over
the limit is answered 413 before a byte of the body is read, and a body sent without one (chunked) is cut
off as soon as it passes the limit. Uploads get SOFTPROMPT_MAX_UPLOAD_BYTES, every other route
SOFTPROMPT_MAX_REQUEST_BYTES. A body must also keep arriving: a pause between chunks past
SOFTPROMPT_BODY_IDLE_TIMEOUT_S, or a body still arriving after SOFTPROMPT_BODY_DEADLINE_S, is 408."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.config import Settings
from app.errors import PayloadTooLarge, RequestTimeout

# The native upload and its OpenAI-shaped twin.
UPLOAD_PATHS = ("/v1/datasets", "/v1/files")
# Room for the multipart framing and the form's other fields around an upload's file.
MULTIPART_OVERHEAD = 64 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, refusal = self._limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await error_response(refusal)(scope, receive, send)
            return
        received, over, complete = 0, False, False
        timeout: RequestTimeout | None = None
        deadline = asyncio.get_running_loop().time() + self.settings.body_deadline_s

        async def counted() -> Message:
            nonlocal received, over, complete, timeout
            if complete:  # past the body, receive() waits for a disconnect, which may take any time
                return await receive()
            wait = min(self.settings.body_idle_timeout_s, deadline - asyncio.get_running_loop().time())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except TimeoutError:
                timeout = RequestTimeout(
                    f"The request body stopped arriving or arrived too slowly: {received} bytes came, with "
                    f"pauses of at most {self.settings.body_idle_timeout_s:g} s and all within "
                    f"{self.settings.body_deadline_s:g} s allowed.",
                    code="body_timeout",
                )
                over = True
                raise timeout from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > limit:
                over = True
                raise refusal
            return message

        async def unless_over(message: Message) -> None:
            if not over:  # past the limit, whatever the app made of the cut-off body is not sent
                await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except (PayloadTooLarge, RequestTimeout):
            if not over:
                raise
        if over:
            response = error_response(timeout or refusal)
            if timeout is not None:  # the rest of the body may still come: not on this connection
                response.headers["Connection"] = "close"
            await response(scope, receive, send)

    def _limit(self, path: str) -> tuple[int, PayloadTooLarge]:
        """(bytes allowed, the error past them) for a request to ``path``."""
        if path.rstrip("/") in UPLOAD_PATHS:
            limit = self.settings.max_upload_bytes
            message = f"The file is larger than the upload limit of {limit} bytes."
            return limit + MULTIPART_OVERHEAD, PayloadTooLarge(message, param="file", code="file_too_large")
        limit = self.settings.max_request_bytes
        message = f"The request body is larger than the limit of {limit} bytes."
        return limit, PayloadTooLarge(message, code="body_too_large")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
