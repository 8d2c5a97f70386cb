"""Request bodies are refused past their limit while they arrive, not after: a declared Content-Length over
the limit is answered 413 before a byte of the body is read, and a body sent without one (chunked) is cut
off as soon as it passes the limit. Uploads get SOFTPROMPT_MAX_UPLOAD_BYTES, every other route
SOFTPROMPT_MAX_REQUEST_BYTES."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.config import Settings
from app.errors import PayloadTooLarge

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
        received, over = 0, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
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
        except PayloadTooLarge:
            if not over:
                raise
        if over:
            await error_response(refusal)(scope, receive, send)

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
