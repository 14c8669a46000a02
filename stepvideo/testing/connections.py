"""Idle TCP connections held against a server, for the connection-limit tests of both servers."""
from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Iterator, List
from urllib.parse import urlparse

import requests


@contextmanager
def idle_connections(url: str, count: int, send: bytes = b"") -> Iterator[List[socket.socket]]:
    """``count`` connections to ``url``'s host and port that send ``send`` (nothing by default; a
    first header byte makes a slow client) and then nothing more, closed on exit."""
    where = urlparse(url)
    held: List[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection((where.hostname, where.port), timeout=5))
            if send:
                held[-1].sendall(send)
        yield held
    finally:
        for sock in held:
            sock.close()


def health_seconds(url: str, timeout: float = 1.0) -> float:
    """Seconds ``GET url/health`` took on a new connection (raises on a timeout or a non-200)."""
    start = time.perf_counter()
    r = requests.get(url + "/health", timeout=timeout)
    r.raise_for_status()
    return time.perf_counter() - start
