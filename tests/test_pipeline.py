"""The frame pipeline's stages: order, backpressure, errors; and the daemon finishing every frame
it inferred before it stops (each becomes a result in the spool, none is silently dropped)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, IMAGES, LABELS, wait_until

from edgecam.core.model import Classifier
from edgecam.device.capture import Capture
from edgecam.device.config import Config
from edgecam.device.daemon import Daemon
from edgecam.device.mqtt import StdoutSink
from edgecam.device.pipeline import Prefetch, Stage, StageFailed
from edgecam.device.sources import Frame, SourceEnded


def test_a_stage_keeps_order_and_blocks_when_behind() -> None:
    gate = threading.Event()
    done: list[int] = []

    def work(n: int) -> None:
        gate.wait()
        done.append(n)

    stage: Stage[int] = Stage("test", work, depth=1)
    stage.put(0)  # taken by the worker, which waits at the gate
    assert wait_until(lambda: stage._queue.qsize() == 0)
    stage.put(1)  # fills the hand-over
    third = threading.Thread(target=stage.put, args=(2,))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "put() must block while the stage is a full hand-over behind"
    gate.set()
    third.join(5)
    stage.close()
    assert done == [0, 1, 2]


def test_a_failing_stage_raises_in_the_caller_and_stops_working() -> None:
    done: list[int] = []

    def work(n: int) -> None:
        if n == 1:
            raise ValueError("bad frame")
        done.append(n)

    stage: Stage[int] = Stage("test", work)
    stage.put(0)
    stage.put(1)
    with pytest.raises(StageFailed, match="bad frame"):
        stage.wait()
    with pytest.raises(StageFailed):
        stage.put(2)
    assert done == [0]


def test_prefetch_starts_when_asked_and_hands_over_errors() -> None:
    started: list[float] = []
    items = iter([1, 2])

    def fetch() -> int:
        started.append(time.monotonic())
        try:
            return next(items)
        except StopIteration:
            raise SourceEnded("done") from None

    stop = threading.Event()
    pre: Prefetch[int] = Prefetch("test", fetch)
    assert pre.get(stop) == 1
    at = time.monotonic() + 0.2
    pre.request(at)
    pre.request()  # a second request while one is pending changes nothing
    assert pre.get(stop) == 2
    assert started[1] >= at, "a request for later must not fetch early"
    with pytest.raises(SourceEnded):
        pre.get(stop)
    stop.set()
    assert Prefetch("idle", lambda: 0).get(stop) is None


class Counted:
    """A stand-in source of one real photograph, pulled in turn; counts what it handed out."""

    live = False
    description = "counted"

    def __init__(self, n: int) -> None:
        self.image = cv2.imread(str(IMAGES / "cat.bmp"))
        self.left = n
        self.read_count = 0

    def open(self) -> None:
        pass

    def read(self) -> Frame:
        if self.left == 0:
            raise SourceEnded("counted out")
        self.left -= 1
        self.read_count += 1
        return Frame(self.image, time.time(), time.monotonic())

    def close(self) -> None:
        self.closed = True


@pytest.mark.model
def test_every_inferred_frame_becomes_a_result_before_the_daemon_returns(capsys: pytest.CaptureFixture) -> None:
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False
    clf = Classifier(DEFAULT_MODEL, LABELS)
    source = Counted(25)
    d = Daemon(cfg, clf, Capture(source), StdoutSink(), "test")
    d.run(0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert source.read_count == 25 and d.processed == 25 and d.seq == 25 and len(lines) == 25
    seqs = [int(ln.split('"seq":')[1].split(",")[0]) for ln in lines]
    assert seqs == list(range(1, 26))


@pytest.mark.model
def test_max_frames_reads_no_frame_it_will_not_use(capsys: pytest.CaptureFixture) -> None:
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False
    source = Counted(100)
    d = Daemon(cfg, Classifier(DEFAULT_MODEL, LABELS), Capture(source), StdoutSink(), "test")
    d.run(7)
    assert d.processed == 7 and d.seq == 7 and source.read_count == 7


@pytest.mark.model
def test_a_failure_after_inference_stops_the_daemon_with_the_error(tmp_path: Path) -> None:
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False
    clf = Classifier(DEFAULT_MODEL, LABELS)
    source = Counted(50)

    class Closing(StdoutSink):
        closed = False

        def close(self, timeout: float) -> int:
            self.closed = True
            return super().close(timeout)

    sink = Closing()
    d = Daemon(cfg, clf, Capture(source), sink, "test")

    class Broken:
        def maps(self, *_args: object) -> np.ndarray:
            raise FloatingPointError("CAM went wrong")

    d.method = Broken()  # type: ignore[assignment]
    with pytest.raises(StageFailed, match="CAM went wrong"):
        d.run(0)
    assert d.seq == 0
    # The shutdown still ran: the source let go, the sink (its spool) closed.
    assert getattr(source, "closed", False) and sink.closed


@pytest.mark.model
def test_a_result_counts_as_made_only_once_the_sink_has_it() -> None:
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False

    class Refusing(StdoutSink):
        def result(self, payload: bytes, seq: int = 0) -> None:
            raise OSError("the spool's disk went away")

    d = Daemon(cfg, Classifier(DEFAULT_MODEL, LABELS), Capture(Counted(5)), Refusing(), "test")
    with pytest.raises(StageFailed, match="disk went away"):
        d.run(0)
    # Stats' "results" (and a command reply's seq) never name a result the spool does not hold.
    assert d.processed >= 1 and d.seq == 0


@pytest.mark.model
def test_the_source_is_never_closed_during_a_read(capsys: pytest.CaptureFixture) -> None:
    """Flat out, the prefetch thread is nearly always reading the next frame; a stop must let that
    read end before the source is closed (a video file's cv2.VideoCapture is not thread-safe)."""
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False

    class Slow(Counted):
        reading = False
        closed_during_read = False

        def read(self) -> Frame:
            self.reading = True
            try:
                time.sleep(0.2)  # a slow decode: the stimulus that keeps a read in progress
                return super().read()
            finally:
                self.reading = False

        def close(self) -> None:
            self.closed_during_read = self.closed_during_read or self.reading
            super().close()

    source = Slow(1000)
    d = Daemon(cfg, Classifier(DEFAULT_MODEL, LABELS), Capture(source), StdoutSink(), "test")
    runner = threading.Thread(target=d.run)
    runner.start()
    assert wait_until(lambda: d.processed >= 2 and source.reading, 30)
    d.stop.set()
    runner.join(30)
    assert not runner.is_alive()
    assert getattr(source, "closed", False) and not source.closed_during_read


@pytest.mark.model
def test_the_loop_turns_while_a_source_is_silent() -> None:
    """A camera that gives no frame for a long read_timeout (600 s allowed) must not hold the loop:
    the watchdog pings from it (the unit's WatchdogSec is 30 s) and commands are answered from it."""
    cfg = Config()
    cfg.device_id = "pipeline"
    cfg.mqtt.enabled = False
    release = threading.Event()

    class Silent:
        live = True
        description = "silent camera"

        def open(self) -> None:
            pass

        def read(self) -> Frame:
            release.wait()
            raise SourceEnded("released")

        def close(self) -> None:
            pass

    replies: list[bytes] = []
    d = Daemon(cfg, Classifier(DEFAULT_MODEL, LABELS), Capture(Silent(), read_timeout=60), StdoutSink(), "test",
               reply=replies.append)
    runner = threading.Thread(target=d.run)
    runner.start()
    try:
        # The loop has asked for the next frame: it is inside get(), past this turn's commands.
        assert wait_until(lambda: d.prefetch._wanted.is_set(), 20)
        assert d.inbox.receive(b'{"cmd": "ping", "id": 1}') is None
        assert wait_until(lambda: replies, 10), "the ping waited for a frame that does not come"
        assert b'"ok":true' in replies[0]
    finally:
        release.set()
        d.stop.set()
        runner.join(30)
    assert not runner.is_alive()


def test_interpreter_threads_leave_a_core_to_the_pipeline() -> None:
    import os
    import subprocess
    import sys

    from edgecam.device.pipeline import interpreter_threads

    assert interpreter_threads(3) == 3
    assert interpreter_threads(0) == max(1, len(os.sched_getaffinity(0)) - 1)
    # On one core there is nothing to leave: still one thread.
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edgecam.device.pipeline import interpreter_threads; print(interpreter_threads(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
