"""Per-stage timings and the retained stats message."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STAGES = ("capture_age", "pre", "infer", "cam", "encode", "overlay", "publish", "total", "handover")


def median(values: Iterable[float]) -> float:
    """The median, as np.median gives it. Not numpy's: np.median imports numpy.ma (1.3 MB), and the
    statistics module decimal and fractions (0.5 MB), into a daemon that has no other use for them."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


class StageTimes:
    """The last `window` frames' stage times (ms), for medians, and frame times for fps."""

    def __init__(self, window: int = 300) -> None:
        self.times: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self.done: deque[float] = deque(maxlen=window)
        # Added to by the finisher thread, read by the loop thread for stats.
        self._lock = threading.Lock()

    def add(self, stage_ms: dict[str, float], finished: float) -> None:
        with self._lock:
            for stage, ms in stage_ms.items():
                self.times[stage].append(ms)
            self.done.append(finished)

    def medians(self) -> dict[str, float]:
        with self._lock:
            return {s: round(median(v), 3) for s, v in self.times.items() if v}

    def fps(self, now: float | None = None, span: float = 10.0) -> float:
        """Frames finished in the last `span` seconds, per second."""
        with self._lock:
            done = list(self.done)
        if len(done) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        recent = [t for t in done if now - t <= span]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


def cpu_temperature(zone: Path = Path("/sys/class/thermal/thermal_zone0/temp")) -> float | None:
    """The SoC temperature in °C where the board has a sensor (every Pi does)."""
    try:
        return round(int(zone.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def stats_payload(**fields: Any) -> bytes:
    return json.dumps({"v": 1, **fields}, separators=(",", ":")).encode("utf-8")
