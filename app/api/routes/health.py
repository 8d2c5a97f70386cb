from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import ServingDep, SettingsDep
from app.db.session import get_engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: backbone not loaded or database down."}})
def readyz(settings: SettingsDep, serving: ServingDep) -> JSONResponse:
    """Ready to serve: the backbone is loaded and the registry database answers."""
    checks = {"backbone": serving.ready or not settings.load_engine, "database": _database_ok(settings)}
    status = 200 if all(checks.values()) else 503
    return JSONResponse(
        {"status": "ready" if status == 200 else "not_ready", "checks": checks}, status_code=status
    )


def _database_ok(settings) -> bool:
    try:
        with get_engine(settings.registry_url).connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
