"""Dependency aliases for the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import MAX_ID
from app.db.session import session_scope
from app.services.api_metrics import Metrics
from app.services.serving.serving import Serving


def _session(request: Request) -> Iterator[Session]:
    """The request's unit of work: committed once when the route returns, before the response is sent (a
    failed commit is the response), rolled back if the route raises. Routes and services do not commit."""
    with session_scope(request.app.state.settings.registry_url) as session:
        yield session


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SessionDep = Annotated[Session, Depends(_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(_settings)]
ServingDep = Annotated[Serving, Depends(_serving)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
LimitQuery = Annotated[int, Query(ge=1, le=100, description="Page size.")]
AfterQuery = Annotated[
    int | None, Query(ge=0, le=MAX_ID, description="Id of the last item of the previous page.")
]
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]

__all__ = ["SessionDep", "SettingsDep", "ServingDep", "MetricsDep", "LimitQuery", "AfterQuery", "IdPath"]
