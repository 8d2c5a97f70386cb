"""OpenAPI descriptions of error responses, so /docs shows what each route can answer."""

from __future__ import annotations

from typing import Any

from app.contract.schemas import ErrorResponse

DESCRIPTIONS = {
    400: "Malformed request.",
    401: "No API key, or one that is unknown or revoked; `WWW-Authenticate` says so too.",
    404: "No such object (another tenant's objects answer exactly like missing ones).",
    409: "Conflicts with the object's current state.",
    413: "Body or file over the size limit.",
    415: "Unsupported file format.",
    422: "Invalid value; `param` names it.",
    429: "A quota of your tenant, or the server's queue, is full; retry after `Retry-After` seconds.",
    503: "A dependency (database, broker, backbone) is unavailable; retry later.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorResponse, "description": DESCRIPTIONS[status]} for status in (*statuses, 503)
    }
