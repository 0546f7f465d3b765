"""Capture: a live source read in its own thread, newest frame wins; or a source pulled in turn.

A camera delivers frames whether or not the model keeps up. Queuing them would make
every result older than the last; instead the capture thread overwrites one slot,
and the loop always takes the newest frame. Overwritten frames are counted as dropped.

A camera that fails (open fails, read errors, empty or misshapen frames, the stream
ends) is closed and opened again with doubling delays, so a missing camera never
spins the CPU. A read that hangs inside a driver cannot be interrupted: after
`read_timeout` the state turns degraded, and after twice that the stuck thread is
left behind and a fresh source is opened in a new one (at most a few such threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgecam.core.errors import EdgecamError
from edgecam.device.sources import Frame, Source, SourceEnded, SourceError

log = logging.getLogger(__name__)

MAX_STUCK = 3  # abandoned capture threads, before edgecam stops starting new ones


@dataclass
class CaptureState:
    captured: int = 0
    dropped: int = 0
    state: str = "starting"  # starting | ok | degraded | ended
    reason: str = ""
    reopens: int = 0
    stuck: int = 0


class Backoff:
    """Delays that double from `first` up to `most`; reset after a success."""

    def __init__(self, first: float = 0.5, most: float = 30.0) -> None:
        self.first, self.most = first, most
        self.current = 0.0

    def next(self) -> float:
        self.current = self.first if not self.current else min(self.current * 2, self.most)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class LatestFrame:
    """One slot: put() overwrites, take() waits for a frame newer than the last taken."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._ended = False
        self.overwritten = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.overwritten += 1
            self._frame = frame
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def take(self, timeout: float) -> Frame | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None or self._ended, timeout):
                return None
            frame, self._frame = self._frame, None
            if frame is None:
                raise SourceEnded("source ended")
            return frame


class Capture:
    """The loop's view of a source: take() the next frame to work on, or None after a timeout.

    `source` is already open (or failed to open: the capture thread keeps trying);
    `renew`, when given, makes a fresh unopened source to replace one stuck in a read.
    """

    def __init__(
        self, source: Source, read_timeout: float = 5.0, renew: Callable[[], Source] | None = None
    ) -> None:
        self.source = source
        self.read_timeout = read_timeout
        self.renew = renew
        self.stats = CaptureState()
        self.needs_open = False
        self._slot = LatestFrame()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._busy_since: float | None = None  # when the thread entered read() or open()
        self._last_frame = time.monotonic()
        self._backoff = Backoff()

    def start(self) -> None:
        self._last_frame = time.monotonic()
        if self.source.live:
            self._spawn()

    def _spawn(self) -> None:
        self._generation += 1
        self._thread = threading.Thread(
            target=self._run, args=(self.source, self._generation), name="edgecam-capture", daemon=True
        )
        self._thread.start()

    def take(self) -> Frame | None:
        """The newest frame; None when none came within read_timeout. Raises SourceEnded at the end."""
        if not self.source.live:
            return self._pull()
        frame = self._slot.take(self.read_timeout)
        self.stats.dropped = self._slot.overwritten
        if frame is not None:
            self._last_frame = time.monotonic()
            return frame
        if self._stop.is_set():
            raise SourceEnded("stopped")
        quiet = time.monotonic() - self._last_frame
        if quiet >= self.read_timeout and self.stats.state in ("ok", "starting"):
            self._degrade(f"no frame for {self.read_timeout:g} s")
        self._unstick()
        return None

    def _unstick(self) -> None:
        """Leave a thread stuck in read() or open() behind and start over with a fresh source."""
        busy = self._busy_since
        if busy is None or time.monotonic() - busy < 2 * self.read_timeout or self.renew is None:
            return
        if self.stats.stuck >= MAX_STUCK:
            return
        self.stats.stuck += 1
        log.warning(
            "source: %s has been stuck for %.0f s; opening a fresh one", self.source.description,
            time.monotonic() - busy,
        )
        self.source = self.renew()
        self._busy_since = None
        self._spawn()

    def _pull(self) -> Frame | None:
        try:
            frame = self.source.read()
        except SourceEnded as exc:
            self._end(exc)
            raise
        except SourceError as exc:
            self._degrade(str(exc))
            self._stop.wait(self._backoff.next())
            return None
        self._ok()
        return frame

    def _run(self, source: Source, generation: int) -> None:
        opened = not self.needs_open
        while not self._stop.is_set() and generation == self._generation:
            try:
                self._busy_since = time.monotonic()
                if not opened:
                    source.open()
                    opened = True
                    self.stats.reopens += 1
                    log.info("source: %s open", source.description)
                frame = source.read()
            except SourceEnded as exc:
                self._end(exc)
                self._slot.end()
                return
            except (SourceError, EdgecamError) as exc:
                self._degrade(str(exc), quiet=True)
                _close(source)
                opened = False
                delay = self._backoff.next()
                log.warning("source: %s; opening again in %.1f s", exc, delay)
                if self._stop.wait(delay):
                    return
                continue
            finally:
                self._busy_since = None
            if generation != self._generation:
                break  # left behind while stuck; a fresh thread has taken over
            self._ok()
            self._slot.put(frame)
        _close(source)

    def _end(self, exc: SourceEnded) -> None:
        self.stats.state = "ended"
        text = str(exc)
        self.stats.reason = text if text != self.source.description else ""

    def _ok(self) -> None:
        self.stats.captured += 1
        if self.stats.state != "ok":
            if self.stats.state == "degraded":
                log.info("source: frames again from %s", self.source.description)
            self.stats.state, self.stats.reason = "ok", ""
            self._backoff.reset()

    def _degrade(self, reason: str, quiet: bool = False) -> None:
        if not quiet and (self.stats.state != "degraded" or self.stats.reason != reason):
            log.warning("source: %s", reason)
        self.stats.state, self.stats.reason = "degraded", reason

    def interrupt(self) -> None:
        """Wake a take() that is waiting; safe from a signal handler."""
        self._stop.set()
        self._slot.end()

    def stop(self) -> None:
        self._stop.set()
        self._slot.end()
        if self._thread is not None:
            # A read() blocked inside a driver cannot be interrupted; the thread is a daemon.
            self._thread.join(timeout=2.0)
        if not self.source.live:
            _close(self.source)


def _close(source: Source) -> None:
    try:
        source.close()
    except Exception as exc:  # a source already gone may fail to close; that is not news
        log.debug("closing %s: %s", source.description, exc)
