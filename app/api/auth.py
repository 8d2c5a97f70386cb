"""Who is calling: `Authorization: Bearer KEY`, or, while no key exists at all, a client on the loopback
interface (served as the tenant "default"). docs/operations.md explains the choice."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.db.session import session_scope
from app.errors import Unauthorized
from app.services.tenancy import tenants
from app.services.tenancy.quotas import InferenceRateLimiter
from app.services.tenancy.tenants import Caller

log = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="API key",
    description="A key from `softprompt keys create --tenant NAME`, sent as `Authorization: Bearer KEY`.",
)
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
# A request relayed by a proxy on this machine arrives from the loopback address but comes from elsewhere.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# The names a person's own browser or curl uses for this machine. Any other Host means a page on another
# site reached us through DNS rebinding; any other Origin means a page on another site sent the request.
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Lookups remembered, known and unknown keys alike; bounded so random keys cannot fill the memory.
CACHED_KEYS = 10_000
CHALLENGE = 'Bearer realm="softprompt"'


class Authenticator:
    """Answers from memory for Settings.auth_cache_ttl_s after each lookup, so most requests cost no query;
    a key created or revoked takes effect within that time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._callers: OrderedDict[str, tuple[Caller | None, float]] = OrderedDict()
        self._keys_exist: tuple[bool, float] | None = None
        self._default: tuple[Caller, float] | None = None
        self._lock = threading.Lock()

    def authenticate(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller:
        if credentials is not None:
            caller = self._caller_for_key(credentials.credentials)
            if caller is None:
                raise Unauthorized(
                    "The API key is not valid: it is unknown or has been revoked.",
                    challenge=f'{CHALLENGE}, error="invalid_token"',
                )
            return caller
        if not self.keys_exist():
            if self.settings.trust_loopback and from_this_machine(request):
                return self._default_caller()
            raise Unauthorized(
                "No API keys exist yet, and without one this server answers only on the loopback interface. "
                "Create a key with `softprompt keys create --tenant NAME` and send it as "
                "`Authorization: Bearer KEY`.",
                challenge=CHALLENGE,
            )
        raise Unauthorized(
            "This request needs an API key: send `Authorization: Bearer KEY`.",
            challenge=CHALLENGE,
        )

    def keys_exist(self) -> bool:
        now = time.monotonic()
        if self._keys_exist is None or now - self._keys_exist[1] >= self.settings.auth_cache_ttl_s:
            with session_scope(self.settings.registry_url) as session:
                self._keys_exist = (tenants.live_keys_exist(session), now)
        return self._keys_exist[0]

    def _caller_for_key(self, key: str) -> Caller | None:
        digest, now = hashlib.sha256(key.encode()).hexdigest(), time.monotonic()
        with self._lock:
            cached = self._callers.get(digest)
        if cached is not None and now - cached[1] < self.settings.auth_cache_ttl_s:
            return cached[0]
        with session_scope(self.settings.registry_url) as session:
            caller = tenants.caller_for_key(session, key=key, settings=self.settings)
        with self._lock:
            self._callers[digest] = (caller, now)
            self._callers.move_to_end(digest)
            while len(self._callers) > CACHED_KEYS:
                self._callers.popitem(last=False)
        return caller

    def _default_caller(self) -> Caller:
        now = time.monotonic()
        if self._default is None or now - self._default[1] >= self.settings.auth_cache_ttl_s:
            with session_scope(self.settings.registry_url) as session:
                self._default = (tenants.default_caller(session, settings=self.settings), now)
        return self._default[0]


def from_this_machine(request: Request) -> bool:
    """A request from a program on this machine, on its own behalf: from the loopback interface, not relayed
    by a proxy that says so, and not sent by a web page from another site through the user's browser (a
    foreign Host is DNS rebinding, a foreign Origin or Sec-Fetch-Site a cross-site request). Open mode and
    /metrics trust exactly this. A proxy on this machine that adds no forwarding header is
    indistinguishable from a local program: docs/operations.md says what to set behind one."""
    client = request.client.host if request.client else ""
    if client not in LOOPBACK_HOSTS or any(h in request.headers for h in PROXY_HEADERS):
        return False
    if _name(request.headers.get("host", "")) not in LOCAL_NAMES:
        return False
    origin = request.headers.get("origin")
    if origin is not None and _name(origin.split("://", 1)[-1]) not in LOCAL_NAMES:
        return False
    return request.headers.get("sec-fetch-site", "same-origin") != "cross-site"


def _name(host: str) -> str:
    """The host of a Host header or of an origin, without its port: "127.0.0.1:8000" -> "127.0.0.1",
    "[::1]:8000" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def _caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(request, credentials)


def _inference_caller(request: Request, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
    limiter: InferenceRateLimiter = request.app.state.inference_limiter
    limiter.hit(caller)
    return caller


CallerDep = Annotated[Caller, Depends(_caller)]
# The credentials themselves, for a long response that checks them again as it goes.
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
# The caller of an inference route, after its tenant's requests-per-second limit (429 past it).
InferenceCallerDep = Annotated[Caller, Depends(_inference_caller)]
