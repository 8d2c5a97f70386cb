"""A deadline for a request's headers. uvicorn bounds idle keep-alive connections and, through
app/api/body_limit.py, we bound bodies; nothing bounds a client that opens connections and sends their
headers a byte at a time, each one held open for as long as it likes. This closes a connection whose
request line and headers have not all arrived within ``timeout_s`` of their first byte (or of the
connection opening)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def bounded(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing connections whose headers are slower than ``timeout_s``."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()
            elif self._deadline is None:
                self._arm()  # the first bytes of the next request on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
