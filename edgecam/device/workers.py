"""Many inferences for one map, spread over several interpreters: one interpreter per worker thread.

The sampling methods (occlusion, LIME, RISE, Score-CAM) and evaluate's curves run the model tens to
thousands of times per picture, one input at a time: the shared models refuse a batch resize (their
reshapes have a fixed batch of 1). The runtime releases the GIL inside invoke(), so N interpreters in
N threads keep N cores busy; an interpreter is not thread-safe, so each worker has its own, made from
the classifier's prepared model with one thread each (the classifier's own may use several).

This lives in the device layer because core has no threads (tests/test_architecture.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgecam.core.errors import EdgecamError
from edgecam.core.methods import Scorer
from edgecam.core.methods.base import CHUNK, masked
from edgecam.core.model import Classifier
from edgecam.core.runtime import make_interpreter

MAX_WORKERS = 16


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


class ThreadScorer(Scorer):
    """A Scorer whose batch is split into contiguous runs, one per worker and its own interpreter."""

    def __init__(self, clf: Classifier, workers: int) -> None:
        super().__init__(clf)
        if not 1 <= workers <= MAX_WORKERS:
            raise EdgecamError(f"--workers {workers}: must be from 1 to {MAX_WORKERS}")
        self.workers = workers
        self._pool = None
        if workers > 1:
            # Made here, in the caller's thread: make_interpreter silences the runtime's INFO lines by
            # pointing fd 2 elsewhere for a moment, which two threads at once would leave pointed there.
            self._interpreters = [make_interpreter(clf.prepared, 1) for _ in range(workers)]
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgecam-worker")

    def _run(self, it: Any, batch: np.ndarray) -> np.ndarray:
        return np.stack([self.clf.infer(batch[k : k + 1], it).scores for k in range(len(batch))])

    def _spread(self, n: int, work: Callable[[Any, slice], np.ndarray]) -> np.ndarray:
        # Contiguous runs, one per interpreter: a call never hands one interpreter to two threads,
        # and the results come back in order.
        runs = [r for r in np.array_split(np.arange(n), self.workers) if len(r)]
        parts = self._pool.map(  # type: ignore[union-attr]
            lambda k: work(self._interpreters[k], slice(int(runs[k][0]), int(runs[k][-1]) + 1)), range(len(runs)))
        return np.concatenate(list(parts))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._pool is None or len(batch) < 2:
            return super().__call__(batch)
        return self._spread(len(batch), lambda it, part: self._run(it, batch[part]))

    def masked(self, x: np.ndarray, masks: np.ndarray, fill: float) -> np.ndarray:
        """As Scorer.masked, each worker making its own masked inputs too (NumPy lets go of the GIL
        on arrays this size), so the masking is spread over the cores with the inferences."""
        if self._pool is None or len(masks) < 2:
            return super().masked(x, masks, fill)

        def work(it: Any, part: slice) -> np.ndarray:
            mine = masks[part]
            return np.concatenate([self._run(it, masked(x, mine[i : i + CHUNK], fill))
                                   for i in range(0, len(mine), CHUNK)])

        return self._spread(len(masks), work)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scorer_for(clf: Classifier, workers: int | None) -> ThreadScorer:
    """The scorer for `--workers N` (None: one per core)."""
    return ThreadScorer(clf, default_workers() if workers is None else workers)
