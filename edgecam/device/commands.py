"""Commands on <prefix>/<device>/cmd: parsing and checking, pure; a rate limit; the inbox.

Each command is a JSON object with "cmd" and an optional "id" that the reply carries:
  {"cmd": "explain", "class": NAME_OR_ID, "frames": N}   CAM of that class in the next N results
  {"cmd": "snapshot"}                                    an overlay with the next result
  {"cmd": "set", "max_fps": 2, "publish": "change", ...} runtime knobs, within their config ranges
  {"cmd": "ping"}
Anything else gets an error reply naming the problem; nothing here can stop the loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgecam.core.errors import EdgecamError, shown
from edgecam.core.labels import class_id
from edgecam.device.config import coerce, settable

log = logging.getLogger(__name__)

MAX_BYTES = 4096
MAX_FRAMES = 1000
# Classes explained at once at a command's request, besides each result's top-1. Each map adds
# up to about 5.8 KB to a result (a 64x64 published map of noise, which PNG cannot shrink): with 8
# a result is at most about 53 KB, under the 64 KB a consumer such as the dashboard accepts.
MAX_CLASSES = 8
# Commands waiting for the loop; more are refused with a reply.
INBOX = 64
# The keys a `set` command may change, as declared in config.py.
SETTABLE = tuple(settable())


class CommandError(ValueError):
    """What is wrong with a command, for the error reply."""


@dataclass
class Command:
    cmd: str
    id: Any = None
    cls: int | None = None  # explain
    frames: int = 1  # explain
    changes: dict[str, Any] = field(default_factory=dict)  # set


def parse(payload: bytes, labels: list[str]) -> Command:
    """A checked command, or CommandError. The request id is recovered whenever possible."""
    if len(payload) > MAX_BYTES:
        raise CommandError(f"payload of {len(payload)} bytes is over {MAX_BYTES}")
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise CommandError("not JSON") from None
    except RecursionError:
        raise CommandError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise CommandError(f"a command is a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    try:
        return _check(obj, labels)
    except CommandError as exc:
        exc.id = rid  # type: ignore[attr-defined]
        raise


def _check(obj: dict[str, Any], labels: list[str]) -> Command:
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int) or len(str(rid)) > 100):
        raise CommandError("'id' must be a string or a number of at most 100 characters")
    name = obj.get("cmd")
    if name is None:
        raise CommandError("no 'cmd'")
    check = CHECKS.get(name) if isinstance(name, str) else None
    if check is None:
        raise CommandError(f"unknown command {shown(name)}; known: {', '.join(CHECKS)}")
    return check(obj, rid, labels)


def _check_explain(obj: dict[str, Any], rid: Any, labels: list[str]) -> Command:
    _no_extra(obj, {"class", "frames"})
    if "class" not in obj:
        raise CommandError("explain needs 'class' (a label or a class id)")
    raw = obj["class"]
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise CommandError("'class' must be a label or a class id")
    try:
        cls = class_id(str(raw), labels)
    except EdgecamError as exc:
        raise CommandError(str(exc).replace("--class ", "class ")) from None
    frames = obj.get("frames", 1)
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise CommandError(f"'frames' must be a whole number from 1 to {MAX_FRAMES}")
    return Command("explain", rid, cls=cls, frames=frames)


def _check_bare(obj: dict[str, Any], rid: Any, labels: list[str]) -> Command:
    _no_extra(obj, set())
    return Command(obj["cmd"], rid)


def _check_set(obj: dict[str, Any], rid: Any, labels: list[str]) -> Command:
    _no_extra(obj, set(SETTABLE))
    declared = settable()
    changes = {}
    for key in SETTABLE:
        if key in obj:
            try:
                changes[key] = coerce(obj[key], declared[key].field, key)
            except EdgecamError as exc:
                raise CommandError(str(exc)) from None
    if not changes:
        raise CommandError(f"set needs one of {', '.join(SETTABLE)}")
    return Command("set", rid, changes=changes)


# Each command's check, by name; the daemon has one handler for each of these names.
CHECKS: dict[str, Callable[[dict[str, Any], Any, list[str]], Command]] = {
    "explain": _check_explain,
    "snapshot": _check_bare,
    "set": _check_set,
    "ping": _check_bare,
}


def _no_extra(obj: dict[str, Any], allowed: set[str]) -> None:
    extra = set(obj) - allowed - {"cmd", "id"}
    if extra:
        raise CommandError(f"unknown field {shown(sorted(extra)[0])} for {obj['cmd']}")


def reply(rid: Any, ok: bool, **fields: Any) -> bytes:
    return json.dumps({"id": rid, "ok": ok, **fields}, separators=(",", ":")).encode("utf-8")


class RateLimit:
    """A token bucket: `rate` a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int = 10, clock: Any = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Inbox:
    """Commands from the network thread to the frame loop: rate-limited, checked, bounded.

    `receive` runs on the network thread and returns the reply to send at once when it
    refuses a command; the loop `take`s the accepted ones and answers them itself.
    """

    def __init__(self, labels: list[str], rate: float, capacity: int = INBOX) -> None:
        self.labels = labels
        self.rate = rate
        self.capacity = capacity
        self.limiter = RateLimit(rate)
        self._queue: deque[Command] = deque()
        self._lock = threading.Lock()
        self._counts = {"accepted": 0, "rejected": 0, "dropped": 0}
        self._dropped_logged = 0.0
        self._closed = ""  # why commands are no longer carried out, once the loop has ended

    def receive(self, payload: bytes) -> bytes | None:
        if not self.limiter.allow():
            self.count("dropped")
            now = time.monotonic()
            if now - self._dropped_logged > 10:
                self._dropped_logged = now
                log.warning("commands: too many; dropped %d so far (limit %g/s)", self.counts()["dropped"],
                            self.rate)
            return None
        try:
            cmd = parse(payload, self.labels)
        except CommandError as exc:
            return self.refuse(getattr(exc, "id", None), str(exc))
        except Exception as exc:  # a command must never take the network thread down with it
            log.error("commands: could not handle a command: %r", exc)
            return self.refuse(None, "internal error handling this command")
        with self._lock:
            closed = self._closed
            if not closed and len(self._queue) < self.capacity:
                self._queue.append(cmd)
                return None
        if closed:
            return self.refuse(cmd.id, closed)
        return self.refuse(cmd.id, f"busy: {self.capacity} commands wait for the frame loop already; "
                                   "this one is not carried out")

    def refuse(self, rid: Any, error: str) -> bytes:
        self.count("rejected")
        log.warning("commands: rejected: %s", error)
        return reply(rid, False, error=error)

    def close(self, why: str) -> list[Command]:
        """The loop has ended: the commands still waiting (to be refused by the caller), and from
        now on each new one is refused with `why` at once. A command the broker handed over is
        answered either way, never left without a reply."""
        with self._lock:
            self._closed = why
        return self.take()

    def take(self) -> list[Command]:
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        return taken

    def count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
