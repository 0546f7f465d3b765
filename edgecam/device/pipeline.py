"""A stage of the frame pipeline: a worker thread taking hand-overs in order, with backpressure.

The loop thread keeps `invoke()` busy; what follows an inference (top-k, CAM, encoding, the
spool) runs here, overlapped with the next frame's `invoke()`. The hand-over holds at most
`depth` items: when the stage falls behind, `put()` blocks, so the loop never runs ahead of
what can be finished, and nothing waits in memory long enough to matter at a crash (an item
not finished was never counted as a result, so `seq` has no holes).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


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
