"""Capture: the newest-frame slot, the capture thread, reopening a failing source, pull mode.

The stand-in sources count and signal with events, so nothing here depends on how fast
the machine is: waits are generous deadlines, never exact counts of sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import wait_until

from edgecam.device.capture import Backoff, Capture, LatestFrame
from edgecam.device.sources import Frame, SourceEnded, SourceError

DEADLINE = 20.0  # seconds; only ever reached when something is broken


def make_frame(n: int) -> Frame:
    return Frame(np.full((2, 2, 3), n % 256, np.uint8), time.time(), time.monotonic(), name=str(n))


def take_frame(cap: Capture, timeout: float = DEADLINE) -> Frame:
    """The next frame, retrying take() while it times out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        frame = cap.take()
        if frame is not None:
            return frame
    raise AssertionError(f"no frame in {timeout} s; stats {cap.stats}")


class CountingSource:
    """A live camera: frames numbered 1, 2, 3... every ~2 ms.

    After `limit` frames read() blocks until `release` is set, then ends (or, when the
    limit was lifted meanwhile, goes on); the first `fail_first` reads raise SourceError.
    """

    def __init__(self, limit: int = 0, fail_first: int = 0, live: bool = True) -> None:
        self.live = live
        self.description = "counting stand-in"
        self.limit = limit
        self.fail_first = fail_first
        self.n = 0
        self.reads = 0
        self.opens = 0
        self.closes = 0
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.reopening = threading.Event()  # set when open() is called again after a failure
        self.proceed = threading.Event()  # open() waits on this while reopening

    def open(self) -> None:
        self.opens += 1
        if self.opens > 1 and not self.reopening.is_set():
            self.reopening.set()
            assert self.proceed.wait(DEADLINE)

    def read(self) -> Frame:
        self.reads += 1
        if self.reads <= self.fail_first:
            raise SourceError(f"stand-in: cable unplugged (read {self.reads})")
        if self.limit and self.n >= self.limit:
            self.blocked.set()
            self.release.wait(DEADLINE)
            if self.limit:  # still limited: the camera is gone for good
                raise SourceEnded(self.description)
        time.sleep(0.002)
        self.n += 1
        return make_frame(self.n)

    def close(self) -> None:
        self.closes += 1


Started = tuple[Capture, CountingSource]
Starter = Callable[..., Started]


@pytest.fixture
def started() -> Iterator[Callable[..., Started]]:
    """A factory for started captures; every one is released and stopped at the end of the test."""
    made: list[Started] = []

    def start(source: CountingSource, read_timeout: float = 5.0, backoff: Backoff | None = None) -> Started:
        source.open()
        cap = Capture(source, read_timeout)
        if backoff is not None:
            cap._backoff = backoff
        made.append((cap, source))
        cap.start()
        return cap, source

    yield start
    for cap, source in made:
        source.release.set()
        source.proceed.set()
        cap.stop()


# --- LatestFrame ----------------------------------------------------------------------------------


def test_latest_frame_keeps_the_newest() -> None:
    slot = LatestFrame()
    for n in range(1, 6):
        slot.put(make_frame(n))
    frame = slot.take(1.0)
    assert frame is not None and frame.name == "5"
    assert slot.overwritten == 4
    # Taken frames are gone: the next take waits for a new one.
    assert slot.take(0.05) is None
    slot.put(make_frame(6))
    frame = slot.take(1.0)
    assert frame is not None and frame.name == "6" and slot.overwritten == 4


def test_latest_frame_empty_times_out() -> None:
    slot = LatestFrame()
    assert slot.take(0.05) is None
    assert slot.overwritten == 0


def test_latest_frame_end_wakes_a_waiting_take() -> None:
    slot = LatestFrame()
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(slot.take(DEADLINE))
        except SourceEnded as exc:
            outcome.append(exc)

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.05)  # most likely waiting by now; the outcome is the same either way
    slot.end()
    t.join(DEADLINE / 2)
    assert not t.is_alive(), "end() did not wake take()"
    assert len(outcome) == 1 and isinstance(outcome[0], SourceEnded)


def test_latest_frame_hands_over_the_last_frame_before_ending() -> None:
    slot = LatestFrame()
    slot.put(make_frame(1))
    slot.end()
    frame = slot.take(1.0)
    assert frame is not None and frame.name == "1"
    with pytest.raises(SourceEnded):
        slot.take(1.0)


# --- Capture: a live source --------------------------------------------------------------------


def test_live_capture_takes_the_newest_frame(started: Starter) -> None:
    cap, src = started(CountingSource())
    assert cap.stats.state in ("starting", "ok")
    taken: list[int] = []
    for _ in range(30):
        n = int(take_frame(cap).name)
        taken.append(n)
        # Let the camera run ahead by at least two frames: the next take must skip to the newest.
        assert wait_until(lambda n=n: src.n >= n + 3)
        nxt = take_frame(cap)
        assert int(nxt.name) >= n + 2, (n, nxt.name)
        taken.append(int(nxt.name))
    assert taken == sorted(set(taken)), "frame numbers are not strictly increasing"
    assert cap.stats.state == "ok" and cap.stats.reason == ""
    assert cap.stats.captured >= len(taken)
    assert 0 < cap.stats.dropped <= cap.stats.captured - len(taken)
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 10
    assert cap._thread is not None and not cap._thread.is_alive()
    assert src.closes >= 1


def test_live_capture_counts_every_frame(started: Starter) -> None:
    """A camera that gives exactly 60 frames and then stalls: captured = taken + dropped, exactly."""
    cap, src = started(CountingSource(limit=60))
    taken: list[int] = []
    while not taken or taken[-1] != 60:
        taken.append(int(take_frame(cap).name))
        assert len(taken) <= 60
    assert src.blocked.wait(DEADLINE)
    assert taken == sorted(set(taken))
    assert cap.stats.captured == 60
    assert cap.stats.dropped == cap.stats.captured - len(taken)
    # The stalled camera now ends: the loop hears of it.
    src.release.set()
    with pytest.raises(SourceEnded):
        take_frame(cap)
    assert cap.stats.state == "ended"


def test_failing_source_is_reopened(started: Starter) -> None:
    src = CountingSource(fail_first=3)
    cap, src = started(src, read_timeout=5.0, backoff=Backoff(0.01, 0.05))
    # The first failure: the capture thread closes the source and, after the backoff, opens it again.
    assert src.reopening.wait(DEADLINE)
    assert cap.stats.state == "degraded"
    assert "cable unplugged" in cap.stats.reason
    assert src.closes == 1
    src.proceed.set()
    assert int(take_frame(cap).name) >= 1
    assert cap.stats.state == "ok" and cap.stats.reason == ""
    assert cap.stats.reopens == 3 and src.opens == 4 and src.closes == 3
    assert cap._backoff.current == 0.0  # reset by the success


def test_reopen_keeps_trying_while_open_fails(started: Starter) -> None:
    class FlakyOpen(CountingSource):
        def open(self) -> None:
            self.opens += 1
            if 2 <= self.opens <= 4:
                raise SourceError(f"stand-in: no device (open {self.opens})")

    src = FlakyOpen(fail_first=1)
    cap, src = started(src, backoff=Backoff(0.01, 0.05))
    assert int(take_frame(cap).name) >= 1
    assert cap.stats.state == "ok" and cap.stats.reason == ""
    assert src.opens == 5 and cap.stats.reopens == 1


def test_stalled_source_degrades_after_read_timeout(started: Starter) -> None:
    cap, src = started(CountingSource(limit=1), read_timeout=0.3)
    assert take_frame(cap).name == "1"
    assert src.blocked.wait(DEADLINE)
    assert cap.take() is None
    assert cap.stats.state == "degraded"
    assert "no frame" in cap.stats.reason and "0.3" in cap.stats.reason
    # Frames again: back to ok.
    src.limit = 0
    src.release.set()
    assert int(take_frame(cap).name) >= 2
    assert cap.stats.state == "ok" and cap.stats.reason == ""


def test_source_that_never_delivers_degrades(started: Starter) -> None:
    cap, src = started(CountingSource(limit=-1), read_timeout=0.3)
    assert src.blocked.wait(DEADLINE)
    assert cap.take() is None
    assert cap.stats.state == "degraded"
    assert "no frame" in cap.stats.reason


# --- Capture: pull mode -----------------------------------------------------------------------------


def test_pull_mode_hands_over_every_frame(started: Starter) -> None:
    src = CountingSource(limit=25, live=False)
    src.release.set()  # at the limit the source ends at once
    cap, src = started(src)
    assert cap._thread is None
    names = [take_frame(cap).name for _ in range(25)]
    assert names == [str(n) for n in range(1, 26)]
    assert cap.stats.captured == 25 and cap.stats.dropped == 0 and cap.stats.state == "ok"
    with pytest.raises(SourceEnded):
        cap.take()
    assert cap.stats.state == "ended"


def test_pull_mode_error_then_frames(started: Starter) -> None:
    src = CountingSource(limit=3, fail_first=1, live=False)
    src.release.set()
    cap, src = started(src, backoff=Backoff(0.01, 0.05))
    assert cap.take() is None
    assert cap.stats.state == "degraded" and "cable unplugged" in cap.stats.reason
    assert [take_frame(cap).name for _ in range(3)] == ["1", "2", "3"]
    assert cap.stats.state == "ok" and cap.stats.captured == 3


# --- Backoff ----------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff()
    assert [b.next() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    b = Backoff(0.5, 3)
    assert [b.next() for _ in range(5)] == [0.5, 1, 2, 3, 3]
    b.reset()
    assert [b.next() for _ in range(2)] == [0.5, 1]
