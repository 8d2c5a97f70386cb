"""Domain failures. Each has a stable ``code``; the HTTP status lives here too so the one mapping in
``app.api.errors`` stays a lookup, and the worker can record the same code on a failed job. What the API
turns into headers is plain data here: ``retry_after_s`` (Retry-After) and an Unauthorized's
``challenge`` (WWW-Authenticate)."""

from __future__ import annotations


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        line: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.line = line
        self.retry_after_s = retry_after_s  # when the same request may succeed, for a busy or absent part
        if code:
            self.code = code


class InvalidRequest(DomainError):
    status = 422
    code = "invalid_request"


class DatasetInvalid(DomainError):
    status = 422
    code = "dataset_invalid"


class PayloadTooLarge(DomainError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(DomainError):
    """A request body that stopped arriving, or arrived too slowly: its connection is freed for others."""

    status = 408
    code = "request_timeout"


class UnsupportedMediaType(DomainError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(DomainError):
    """No usable API key. The caller learns nothing else: not which tenants or objects exist."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, challenge: str, code: str | None = None):
        super().__init__(message, code=code)
        self.challenge = challenge  # how to authenticate: an RFC 6750 Bearer challenge


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class Overloaded(DomainError):
    status = 429
    code = "overloaded"


class QuotaExceeded(Overloaded):
    """A tenant's own limit, as opposed to the whole server being busy."""

    code = "quota_exceeded"


class ClientGone(DomainError):
    """The client closed the connection before its answer was ready; its work was stopped. Nobody reads the
    response: the status is nginx's "client closed request", for the access log and the metrics."""

    status = 499
    code = "client_closed_request"


class Unavailable(DomainError):
    status = 503
    code = "unavailable"


class PromptCorrupt(DomainError):
    """A stored prompt version cannot be used (wrong shape, NaN, checksum mismatch)."""

    status = 422
    code = "prompt_corrupt"


class UnsupportedBackbone(DomainError):
    """A configured backbone whose architecture cannot run soft prompts correctly (found when it loads)."""

    status = 503
    code = "unsupported_backbone"


class InferenceFailed(DomainError):
    """The engine could not compute a request's rows (a fault on the server, not in the request)."""

    status = 500
    code = "inference_failed"
