"""`edgecam watch` in a real terminal (a pty) against a real Mosquitto: whatever a device, or anyone able
to publish under the prefix, puts in labels, status or topics reaches the screen escaped, never as
terminal control sequences."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import numpy as np
from broker import Broker, publish
from conftest import ROOT

from edgecam.contract import result_payload

TITLE = "\x1b]0;pwned\x07"  # sets the terminal's title
CLEAR = "\x1b[2J"  # clears the screen
HOSTILE = [TITLE, CLEAR, "\r", "\x9b31m", "\u202e", "\x00", "\x7f", "\n"]


def hostile_result(device: str, seq: int) -> bytes:
    label = f"cat{TITLE}{CLEAR}\rfake line\x9b31m\u202eevil\ndevice-x #9  ok"
    cam = (np.arange(49, dtype=np.float32).reshape(7, 7) - 10.0) / 4.0
    return result_payload(device=device, boot="b", seq=seq, ts=0.0, model="m", top=[(1, label, 0.9), (2, "dog", 0.1)],
                          cam_id=1, cam_label=label, cam=cam, timing_ms={"total": 1.0})


class Terminal:
    """A process on a pty; everything it writes, as the bytes a terminal would receive."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "edgecam", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=ROOT, close_fds=True)
        os.close(slave)
        self.screen = b""

    def read_until(self, needle: bytes, timeout: float = 60) -> bool:
        end = time.monotonic() + timeout
        while needle not in self.screen and time.monotonic() < end:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # the process ended and closed the pty
                    break
        return needle in self.screen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        os.close(self.master)


def test_watch_escapes_control_sequences_from_the_broker(broker: Broker) -> None:
    term = Terminal("watch", "--broker", broker.address, "--heatmap", "--timeout", "120")
    try:
        assert term.read_until(b"watching edgecam/+/"), term.screen
        publish(broker.port, "edgecam/cam-1/status", f"online{TITLE}{CLEAR}".encode())
        publish(broker.port, "edgecam/cam-1/result", hostile_result("cam-1", 1))
        # Mosquitto itself refuses topics with C0 controls; a bidi override and a space it passes on.
        publish(broker.port, "edgecam/x\u202e y/result", hostile_result("cam-1", 2))
        publish(broker.port, "edgecam/cam-1/result", json.dumps({"v": f"1{TITLE}", "device": "cam-1"}))
        publish(broker.port, "edgecam/cam-1/result", hostile_result("cam-1", 3))
        assert term.read_until(b"cam-1 #3"), term.screen
    finally:
        term.close()
    screen = term.screen
    # Nothing from the network arrived as a control character: the only ones on the screen are the
    # pty's own line endings (\r\n) and no ESC, BEL, C1 CSI or bidi override at all.
    assert b"\x1b" not in screen and b"\x07" not in screen and b"\xc2\x9b" not in screen, screen
    assert "\u202e".encode() not in screen and b"\x00" not in screen and b"\x7f" not in screen
    assert screen.replace(b"\r\n", b"").count(b"\r") == 0 and screen.count(b"\n") == screen.count(b"\r\n")
    text = screen.decode()
    # ... and each is shown as its escape, where it was.
    assert "cam-1 is online\\x1b]0;pwned\\x07\\x1b[2J" in text
    assert "cam-1 #1  cat\\x1b]0;pwned\\x07\\x1b[2J\\x0dfake line\\x9b31m\\u202eevil\\x0adevice-x #9  ok 0.90" in text
    assert "  CAM of cat\\x1b]0;pwned\\x07\\x1b[2J\\x0dfake line" in text
    # A topic level that is not a device id, and a broken result, are named, escaped too.
    assert "edgecam/x\\u202e y/result: not a device id" in text
    assert "bad result: contract version '1\\x1b]0;pwned\\x07'" in text
    # The line a label tried to fake never starts a line of its own.
    assert not any(line.startswith("device-x #9") for line in text.splitlines())


def test_watch_ends_quietly_when_its_reader_goes(broker: Broker) -> None:
    # `edgecam watch | head -1`: once the reader has gone, watch stops, without a traceback.
    watch = subprocess.Popen([sys.executable, "-m", "edgecam", "watch", "--broker", broker.address, "--timeout", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert watch.stderr is not None and watch.stdout is not None
    assert b"watching" in watch.stderr.readline()
    publish(broker.port, "edgecam/cam-1/status", b"online")
    assert watch.stdout.readline() == b"cam-1 is online\n"
    watch.stdout.close()
    for i in range(3):  # the first write after the close may still fit the pipe's buffer: the next ones fail
        publish(broker.port, f"edgecam/cam-{i}/status", b"offline")
        if watch.poll() is not None:
            break
    assert watch.wait(30) == 0
    assert b"Traceback" not in watch.stderr.read()
