"""The systemd watchdog is fed by the frame loop: a hung loop stops the pings while the process lives.

A real `edgecam run` process on a real notify socket; the hang is a stand-in stage (the loop's
per-frame step, wrapped) that blocks on a FIFO until the test writes to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IMAGES, ROOT
from notify_socket import NotifySocket

pytestmark = pytest.mark.usefixtures("model_cache")

HARNESS = """
import os, sys
from edgecam.device import daemon
from edgecam.cli import main

trigger, fifo = sys.argv[1], sys.argv[2]
step = daemon.Daemon.step

def hanging_step(self, frame):
    if os.path.exists(trigger):
        os.unlink(trigger)
        # Through the same socket, so the test sees it in order with the pings.
        self.notifier.send(x_hung=1)
        with open(fifo) as f:  # blocks until the test opens the FIFO for writing, then until it closes
            f.read()
        self.notifier.send(x_resumed=1)
    step(self, frame)

daemon.Daemon.step = hanging_step
sys.exit(main(sys.argv[3:]))
"""


def test_a_hung_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    trigger, fifo = tmp_path / "hang", tmp_path / "fifo"
    os.mkfifo(fifo)
    interval = 0.2  # WATCHDOG_USEC / 2
    env = {**os.environ, "NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": str(int(2 * interval * 1e6)),
           "EDGECAM_SPOOL_DIR": str(tmp_path / "state")}
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(trigger), str(fifo),
         "run", "--source", str(IMAGES), "--source-fps", "10", "--no-mqtt", "--device-id", "dev-w"],
        stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
    )
    messages, receive = sock.messages, sock.receive

    def pings(after: str | None = None) -> int:
        start = 0 if after is None else next(i for i, m in enumerate(messages) if after in m)
        return sum(m.get("WATCHDOG") == "1" for m in messages[start:])

    def text() -> str:
        return (tmp_path / "daemon.log").read_text(errors="replace")

    try:
        receive(time.monotonic() + 120, lambda: any(m.get("READY") == "1" for m in messages))
        assert any(m.get("READY") == "1" for m in messages), text()
        receive(time.monotonic() + 30, lambda: pings("READY") >= 5)
        assert pings("READY") >= 5, messages  # the loop feeds the watchdog while it turns

        trigger.touch()
        receive(time.monotonic() + 30, lambda: any("X_HUNG" in m for m in messages))
        assert any("X_HUNG" in m for m in messages), text()
        # Ten ping intervals with the loop hung: not one ping, and the process is alive throughout.
        receive(time.monotonic() + 10 * interval)
        assert proc.poll() is None, text()
        assert pings("X_HUNG") == 0, messages

        # Let it go: the pings come back, so the socket and the process were live all along.
        with open(fifo, "w") as f:
            f.write("go")
        receive(time.monotonic() + 30, lambda: any("X_RESUMED" in m for m in messages) and pings("X_RESUMED") >= 3)
        assert pings("X_RESUMED") >= 3, (messages, text())
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        sock.close()
    assert proc.returncode == 0, text()
