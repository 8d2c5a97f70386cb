"""Every request's text checked once, before any route sees it (app/input_text.py has the rule): path and
query parameters, header values, and the body FastAPI parsed, JSON or form. Installed as a dependency of
the whole application, so a route added later is covered without knowing it."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile

from app.errors import InvalidRequest
from app.input_text import check_json, check_text

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def checked_input(request: Request) -> None:
    for name, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, param=name)
    for name, value in request.query_params.multi_items():
        check_text(value, param=name)
    for name, value in request.headers.items():
        if "\x00" in value:
            message = f"The {name} header contains a NUL character."
            raise InvalidRequest(message, param=name, code="invalid_text")
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return  # the route reads no body, so there is nothing in it to check
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type in FORM_TYPES:
        # Parsed already by FastAPI for the route; Starlette hands back the same form.
        for name, value in (await request.form()).multi_items():
            if isinstance(value, UploadFile):
                check_text(value.filename or "", param=name)
            else:
                check_text(value, param=name)
    elif content_type == "application/json" or content_type.endswith("+json"):
        try:
            body = await request.json()  # parsed already; a body that isn't JSON is refused by FastAPI
        except (ValueError, RecursionError):
            return
        check_json(body)
