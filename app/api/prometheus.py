"""Prometheus: every request counted and timed by its route template, and `GET /metrics` to scrape.

`/metrics` names tenants and tasks, so it is not public: it answers programs on this machine (the loopback
interface, with a local Host and no foreign Origin: the same test as open mode), and others that send
`Authorization: Bearer <SOFTPROMPT_METRICS_TOKEN>` when that is set."""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import from_this_machine
from app.errors import Unauthorized
from app.services.api_metrics import Metrics

router = APIRouter(tags=["health"])


class RequestMetrics:
    """Counts and times each HTTP request by method, route template (not the raw path: ids would make a
    label per object) and status; the time runs to the response's last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    settings = request.app.state.settings
    token = settings.metrics_token
    sent = request.headers.get("authorization", "")
    allowed = bool(token) and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())
    if not (allowed or (settings.trust_loopback and from_this_machine(request))):
        raise Unauthorized(
            "Metrics are served on the loopback interface, or with SOFTPROMPT_METRICS_TOKEN as Bearer token.",
            challenge='Bearer realm="softprompt-metrics"',
        )
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
