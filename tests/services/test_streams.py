from __future__ import annotations

import pytest

from app.errors import Overloaded, QuotaExceeded
from app.services.serving.streams import StreamSlots


def test_streams_are_capped_per_tenant_and_in_all_and_a_slot_is_freed_once():
    slots = StreamSlots(per_tenant=2, total=3)
    a1, a2 = slots.acquire(1), slots.acquire(1)
    with pytest.raises(QuotaExceeded) as refused:
        slots.acquire(1)
    assert refused.value.code == "too_many_streams" and refused.value.retry_after_s
    slots.acquire(2)
    with pytest.raises(Overloaded):  # the server's cap, reached by two tenants together
        slots.acquire(3)
    a1()
    a1()  # a second release of the same stream frees nothing more
    assert slots.open(1) == 1 and slots.open() == 2
    slots.acquire(3)
    a2()
    assert slots.open(1) == 0
