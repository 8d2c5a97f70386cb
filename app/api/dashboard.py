"""The dashboard: three static files, no build step. The page holds no data; its JavaScript reads the
public /v1 API with the key the user types, so it can show nothing that key could not read."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.errors import NotFound

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).parent / "static"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "favicon.svg": "image/svg+xml"}
# Only our own script and styles run on the page, and it cannot be framed by another site.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers=HEADERS)


@router.get("/dashboard/{asset}")
def dashboard_asset(asset: str) -> FileResponse:
    if asset not in ASSETS:
        raise NotFound(f"No dashboard file {asset!r}.")
    return FileResponse(STATIC / asset, media_type=ASSETS[asset], headers=HEADERS)
