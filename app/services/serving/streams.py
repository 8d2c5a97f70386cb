"""Open event streams, counted per tenant and in all, in this process. A stream holds a connection and
reads the registry every half second for as long as its job runs; uncapped, one key opened 1,000 of them
and every other request of the process waited behind their polls (/healthz took 17 s)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.errors import Overloaded, QuotaExceeded


class StreamSlots:
    def __init__(self, *, per_tenant: int, total: int):
        self.per_tenant, self.total = per_tenant, total
        self._open: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant_id: int) -> Callable[[], None]:
        """A slot for one stream of ``tenant_id``, or 429 at once; call the returned function, once, when the
        stream ends."""
        with self._lock:
            held = self._open.get(tenant_id, 0)
            if held >= self.per_tenant:
                raise QuotaExceeded(
                    f"You have {held} event streams open, the most one tenant may "
                    f"(SOFTPROMPT_TENANT_MAX_EVENT_STREAMS); close one, or read the events as a list.",
                    code="too_many_streams",
                    retry_after_s=5,
                )
            if sum(self._open.values()) >= self.total:
                raise Overloaded(
                    f"The server has {self.total} event streams open, its most "
                    "(SOFTPROMPT_MAX_EVENT_STREAMS); retry shortly, or read the events as a list.",
                    code="too_many_streams",
                    retry_after_s=5,
                )
            self._open[tenant_id] = held + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                left = self._open.get(tenant_id, 1) - 1
                if left:
                    self._open[tenant_id] = left
                else:
                    self._open.pop(tenant_id, None)

        return release

    def open(self, tenant_id: int | None = None) -> int:
        with self._lock:
            return sum(self._open.values()) if tenant_id is None else self._open.get(tenant_id, 0)
