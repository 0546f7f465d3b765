"""A stage of the frame pipeline: a worker thread taking hand-overs in order, with backpressure.

The loop thread keeps `invoke()` busy; what follows an inference (top-k, CAM, encoding, the
spool) runs here, overlapped with the next frame's `invoke()`. The hand-over holds at most
`depth` items: when the stage falls behind, `put()` blocks, so the loop never runs ahead of
what can be finished, and nothing waits in memory long enough to matter at a crash (an item
not finished was never counted as a result, so `seq` has no holes).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()


def interpreter_threads(configured: int) -> int:
    """The interpreter's threads: as configured, or (0) one fewer than the cores this process may
    use, at least one. The frame pipeline keeps one core busy scaling the next frame and finishing
    the last (CAM, encoding, the spool, the sender); invoke() threads on that core would only
    take turns with it (docs/performance.md has the measurement)."""
    if configured:
        return configured
    return max(1, len(os.sched_getaffinity(0)) - 1)


class StageFailed(RuntimeError):
    """The stage's work raised; the original exception is the cause."""


class Stage(Generic[T]):
    def __init__(self, name: str, work: Callable[[T], None], depth: int = 1) -> None:
        self.name = name
        self._work = work
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"edgecam-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._work(item)  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the loop thread, which decides
                self._error = exc
            finally:
                self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise StageFailed(f"{self.name} failed: {self._error!r}") from self._error

    def put(self, item: T) -> None:
        """Hand an item over; blocks while the stage is `depth` items behind."""
        self._check()
        self._queue.put(item)

    def wait(self) -> None:
        """Until everything handed over is finished."""
        self._queue.join()
        self._check()

    def close(self) -> None:
        """Finish what was handed over, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()
        self._check()


class Prefetch(Generic[T]):
    """Takes the next item on its own thread when asked, so that it is ready when wanted.

    The loop asks for the next frame as soon as it has the current one (when it runs flat out),
    and the frame is read and scaled while the current one is in `invoke()`. Asking only when a
    frame is wanted (a paced loop) keeps frames fresh. `get()` returns what `fetch` returned or
    raises what it raised.
    """

    def __init__(self, name: str, fetch: Callable[[], T]) -> None:
        self._fetch = fetch
        self._wanted = threading.Event()
        self._at = 0.0  # monotonic time to start fetching at
        self._ready = threading.Condition()
        self._result: tuple[bool, object] | None = None  # (ok, value or exception)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"edgecam-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed:
                return
            delay = self._at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                result: tuple[bool, object] = (True, self._fetch())
            except BaseException as exc:  # handed to the loop thread, which decides
                result = (False, exc)
            with self._ready:
                self._wanted.clear()
                self._result = result
                self._ready.notify_all()
            if not result[0] or self._closed:
                return

    def request(self, at: float = 0.0) -> None:
        """Fetch the next item, from monotonic time `at` on (0: now), unless one is already
        being fetched or waits. Starting just in time keeps a fast source's frames fresh."""
        with self._ready:
            if self._result is None and not self._wanted.is_set():
                self._at = at
                self._wanted.set()

    def get(self, stop: threading.Event, poll: float = 0.25, timeout: float | None = None) -> T | None:
        """The requested item (requesting it if needed); None once `stop` is set, or when it has
        not come within `timeout` seconds (it stays requested: a later get() has it)."""
        self.request()
        end = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while self._result is None:
                if stop.is_set() or (end is not None and time.monotonic() >= end):
                    return None
                self._ready.wait(poll)
            (ok, value), self._result = self._result, None
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]

    def close(self, timeout: float = 2.0) -> None:
        """End the thread, after the fetch in progress: the source it reads may be closed next
        (OpenCV's capture is not thread-safe). A fetch stuck longer than `timeout` is left behind."""
        self._closed = True
        self._wanted.set()
        self._thread.join(timeout)
