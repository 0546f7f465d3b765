"""systemd's notify protocol: READY, WATCHDOG, STATUS, STOPPING, RELOADING. A few lines of our own.

The protocol is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket
named by $NOTIFY_SOCKET ('@' at its start means the abstract namespace). Outside
systemd the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.address:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("systemd notify: cannot make a socket: %s", exc)
        # systemd sets WATCHDOG_USEC (and WATCHDOG_PID) when WatchdogSec= is on; ping at half of it.
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        on = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if on else 0.0
        self._next_ping = 0.0
        self._failed = False

    @property
    def active(self) -> bool:
        return self.sock is not None

    def send(self, **fields: str | int) -> None:
        if self.sock is None:
            return
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode("utf-8", "replace")
        try:
            self.sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failed:  # say it once; systemd may simply be gone at shutdown
                log.warning("systemd notify: %s: %s", self.address.lstrip("\0"), exc)
                self._failed = True

    def ready(self, status: str) -> None:
        # A ping with READY: after a reload the watchdog has been running through the restart.
        self.send(ready=1, status=status, mainpid=os.getpid(), **self._ping_now())

    def status(self, text: str) -> None:
        self.send(status=text)

    def watchdog(self) -> None:
        """A ping, at most every half WatchdogSec; called from the frame loop, so a hung loop stops them."""
        if not self.watchdog_interval:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.watchdog_interval
            self.send(watchdog=1)

    def stopping(self) -> None:
        self.send(stopping=1, status="stopping")

    def reloading(self) -> None:
        # The watchdog keeps running through a reload (drain, exec, imports, model load: found
        # taking over 30 s under emulation), so the reload starts with a fresh ping.
        self.send(reloading=1, status="reloading the configuration", **self._ping_now())

    def _ping_now(self) -> dict[str, int]:
        if not self.watchdog_interval:
            return {}
        self._next_ping = time.monotonic() + self.watchdog_interval
        return {"watchdog": 1}
