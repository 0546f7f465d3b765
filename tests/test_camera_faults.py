"""A camera that fails in each way a real one does, then comes back: the daemon recovers by itself.

The daemon runs in this process (the real classifier, capture thread, spool and MQTT
connection to a real Mosquitto) with a stand-in camera whose failures the test switches
on and off. What the test checks is what an operator sees on the broker: results stop,
status turns "degraded" with the reason in stats, then results and "online" return.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from broker import Broker, Recorder
from conftest import DEFAULT_MODEL, IMAGES, LABELS

from edgecam.core.model import Classifier
from edgecam.device.capture import Capture
from edgecam.device.config import Config
from edgecam.device.daemon import Daemon
from edgecam.device.mqtt import MqttSink
from edgecam.device.run import make_spool
from edgecam.device.sources import Frame, SourceError, check_frame

pytestmark = pytest.mark.model

MODES = ["open_fails", "read_error", "stream_ends", "empty_frame", "wrong_shape", "read_hangs"]


class Camera:
    """Shared state of the stand-in cameras: which failure is on, and how often they were poked."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.failing = threading.Event()
        self.released = threading.Event()  # ends a hanging read
        self.opens = 0
        self.reads = 0
        self.frame = cv2.imread(str(IMAGES / "cat.bmp"))


class StandIn:
    """One opened camera, with picamera2's and VideoCapture's way of failing."""

    live = True
    description = "stand-in camera"

    def __init__(self, cam: Camera) -> None:
        self.cam = cam

    def open(self) -> None:
        self.cam.opens += 1
        if self.cam.failing.is_set() and self.cam.mode == "open_fails":
            raise SourceError("stand-in camera: cannot open (device gone)")

    def read(self) -> Frame:
        cam = self.cam
        cam.reads += 1
        time.sleep(0.02)  # a camera's frame interval
        if cam.failing.is_set():
            mode = cam.mode
            if mode in ("open_fails", "read_error"):
                raise SourceError("stand-in camera: read failed (I/O error)")
            if mode == "stream_ends":
                raise SourceError("stand-in camera: read failed (stream ended or device gone)")
            if mode == "empty_frame":
                check_frame(np.zeros((0, 0, 3), np.uint8), "stand-in camera")
            if mode == "wrong_shape":
                check_frame(np.zeros((480, 640, 2), np.uint8), "stand-in camera")
            if mode == "read_hangs":
                cam.released.wait()
        return Frame(cam.frame, time.time(), time.monotonic())

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(DEFAULT_MODEL, LABELS, num_threads=2, name=DEFAULT_MODEL.stem)


@pytest.mark.parametrize("mode", MODES)
def test_daemon_recovers_from_a_failing_camera(mode: str, classifier: Classifier, broker: Broker,
                                               tmp_path: Path) -> None:
    cam = Camera(mode)
    cfg = Config()
    cfg.device_id = f"cam-{mode.replace('_', '-')}"
    cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker.port
    cfg.spool.dir = str(tmp_path / "state")
    cfg.loop.max_fps = 10
    cfg.loop.stats_interval = 1
    cfg.source.read_timeout = 0.5
    capture = Capture(StandIn(cam), cfg.source.read_timeout, renew=lambda: StandIn(cam))
    capture._backoff.first, capture._backoff.most = 0.2, 1.0
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    daemon = Daemon(cfg, classifier, capture, sink, "test")
    rec = Recorder(broker.port, f"edgecam/{cfg.device}/#")
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert rec.wait_for(lambda m: len(_results(m)) >= 3, 60)

        cam.failing.set()
        failed_at = time.time()
        assert rec.wait_for(lambda m: _status(m)[-1:] == [b"degraded"], 20), _status(rec.messages)
        expected = {"open_fails": "cannot open", "read_error": "I/O error", "stream_ends": "stream ended",
                    "empty_frame": "empty frame", "wrong_shape": "not an 8-bit colour image",
                    "read_hangs": "no frame for 0.5 s"}[mode]
        assert rec.wait_for(
            lambda m: bool(_stats(m)) and _stats(m)[-1]["state"] == "degraded" and expected in _stats(m)[-1]["reason"],
            10,
        ), _stats(rec.messages)[-1:]
        # While it fails: no results of frames captured since, and the camera is not hammered (backoff,
        # not a busy loop). Results of earlier frames may still be on their way (a slow runtime).
        pokes = cam.opens + cam.reads
        time.sleep(3)
        made_since = [r for r in map(json.loads, _results(rec.messages)) if _epoch(r["ts"]) > failed_at + 1.0]
        assert made_since == []
        assert cam.opens + cam.reads - pokes <= 25, f"{cam.opens + cam.reads - pokes} opens and reads in 3 s"
        if mode == "open_fails":
            assert cam.opens >= 2  # it keeps trying to open

        cam.failing.clear()
        cam.released.set()
        count = len(_results(rec.messages))
        assert rec.wait_for(lambda m: len(_results(m)) >= count + 3, 60), capture.stats
        assert rec.wait_for(lambda m: _status(m)[-1:] == [b"online"], 10)
        assert rec.wait_for(lambda m: _stats(m)[-1]["state"] == "ok", 10)
        seqs = [json.loads(p)["seq"] for p in _results(rec.messages)]
        assert seqs == list(range(1, len(seqs) + 1))
        if mode == "read_hangs":
            assert capture.stats.stuck >= 1  # the stuck thread was left behind for a fresh one
    finally:
        cam.released.set()
        daemon.stop.set()
        capture.interrupt()
        runner.join(30)
        rec.close()
    assert not runner.is_alive()


def _epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _results(messages: list[tuple[str, bytes, bool]]) -> list[bytes]:
    return [p for t, p, _ in messages if t.endswith("/result")]


def _status(messages: list[tuple[str, bytes, bool]]) -> list[bytes]:
    return [p for t, p, _ in messages if t.endswith("/status")]


def _stats(messages: list[tuple[str, bytes, bool]]) -> list[dict]:
    return [json.loads(p) for t, p, _ in messages if t.endswith("/stats")]
