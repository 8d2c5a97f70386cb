"""The header deadline of `softprompt api` (app/api/slow_headers.py), over real sockets: headers sent a byte
at a time, or never, lose their connection; a slow answer or an idle kept-alive connection does not."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from app.api.slow_headers import bounded

TIMEOUT_S = 0.3


async def _slow_answer(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(2 * TIMEOUT_S)  # longer than the header deadline: a request under way is not cut
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _serving() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(_slow_answer, port=port, log_config=None, http=bounded(TIMEOUT_S), lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _closed_within(connection: socket.socket, seconds: float) -> bool:
    connection.settimeout(seconds)
    try:
        return connection.recv(1024) == b""
    except TimeoutError:
        return False


REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


def test_headers_that_never_finish_or_never_start_lose_their_connection():
    with _serving() as port:
        silent = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        for byte in REQUEST[:20]:
            trickling.sendall(bytes([byte]))
            time.sleep(0.01)
        assert _closed_within(trickling, 2) and _closed_within(silent, 2)
        assert time.monotonic() - started < 2


def test_a_slow_answer_and_an_idle_kept_alive_connection_are_not_cut():
    with _serving() as port, socket.create_connection(("127.0.0.1", port)) as connection:
        connection.settimeout(5)
        for _ in range(2):
            connection.sendall(REQUEST)
            answer = b""
            while not answer.endswith(b"ok"):
                answer += connection.recv(1024)
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(2 * TIMEOUT_S)  # idle between requests: uvicorn's keep-alive (5 s) bounds that
