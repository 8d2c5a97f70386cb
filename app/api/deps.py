"""Dependency aliases for the routes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract.kinds import MAX_ID
from app.contract.schemas import METADATA_KEY_CHARS, METADATA_PAIRS, METADATA_VALUE_CHARS
from app.db.session import session_scope
from app.errors import InvalidRequest
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

_METADATA_PARAM = re.compile(r"metadata\[(.*)\]", re.S)


def _metadata_filter(request: Request) -> dict[str, str]:
    """OpenAI's list filter, ``?metadata[key]=value`` (once per key), bounded as metadata is."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if (match := _METADATA_PARAM.fullmatch(name)) is None:
            continue
        key = match[1]
        if not 1 <= len(key) <= METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"A metadata filter's key is 1 to {METADATA_KEY_CHARS} characters; got {len(key)}.",
                param="metadata",
            )
        param = f"metadata[{key}]"
        if len(value) > METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"{param} is {len(value)} characters; a metadata value holds at most {METADATA_VALUE_CHARS}.",
                param=param,
            )
        if key in pairs:
            raise InvalidRequest(f"{param} is given twice; give each key once.", param=param)
        pairs[key] = value
    if len(pairs) > METADATA_PAIRS:
        raise InvalidRequest(
            f"{len(pairs)} metadata filters; a run holds at most {METADATA_PAIRS} pairs.", param="metadata"
        )
    return pairs


# The ?metadata[key]=value pairs of a list; not in the OpenAPI schema, which cannot name such parameters.
MetadataFilter = Annotated[dict[str, str], Depends(_metadata_filter)]

__all__ = [
    "SessionDep",
    "SettingsDep",
    "ServingDep",
    "MetricsDep",
    "LimitQuery",
    "AfterQuery",
    "IdPath",
    "MetadataFilter",
]
