"""systemd's side of the notify protocol for tests: a real datagram socket at NOTIFY_SOCKET that
collects what the daemon sends, each datagram as a dict (READY=1, WATCHDOG=1, STATUS=...)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType


class NotifySocket:
    def __init__(self, path: Path, poll: float = 0.2) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        # A short poll, so a `done` condition is looked at often while nothing arrives.
        self._sock.settimeout(poll)

    def receive(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        """Collect datagrams until the monotonic time `until`, or sooner once `done()` holds."""
        while time.monotonic() < until and not done():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
