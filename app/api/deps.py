"""Dependency aliases for the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.db.session import get_sessionmaker
from app.services.serving import Serving


def _session(request: Request) -> Iterator[Session]:
    session = get_sessionmaker(request.app.state.settings.registry_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _serving(request: Request) -> Serving:
    return request.app.state.serving


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
ServingDep = Annotated[Serving, Depends(_serving)]
LimitQuery = Annotated[int, Query(ge=1, le=100, description="Page size.")]
AfterQuery = Annotated[int | None, Query(description="Id of the last item of the previous page.")]

__all__ = ["SessionDep", "SettingsDep", "ServingDep", "LimitQuery", "AfterQuery", "get_settings"]
