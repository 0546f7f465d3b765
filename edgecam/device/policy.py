"""When to publish a result and when to attach an overlay. Pure state machines, no clocks of their own."""

from __future__ import annotations


class PublishPolicy:
    """'every': publish each result. 'change': publish when the top-1 class changes, when its
    score moves more than `delta` from the last published one, or when `heartbeat` seconds
    have passed, so a dashboard can tell a quiet device from a dead one."""

    def __init__(self, mode: str = "every", delta: float = 0.1, heartbeat: float = 30.0) -> None:
        if mode not in ("every", "change"):
            raise ValueError(f"publish mode {mode!r} is not 'every' or 'change'")
        self.mode, self.delta, self.heartbeat = mode, delta, heartbeat
        self._last: tuple[int, float, float] | None = None  # class, score, time

    def decide(self, top1: int, score: float, now: float) -> bool:
        last = self._last
        publish = (
            self.mode == "every"
            or last is None
            or top1 != last[0]
            or abs(score - last[1]) > self.delta
            or now - last[2] >= self.heartbeat
        )
        if publish:
            self._last = (top1, score, now)
        return publish


class EveryN:
    """True on the 1st, (n+1)th, (2n+1)th... call; never when n is 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._count = 0

    def due(self) -> bool:
        if self.n <= 0:
            return False
        hit = self._count % self.n == 0
        self._count += 1
        return hit
