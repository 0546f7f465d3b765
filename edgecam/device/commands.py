"""Commands on <prefix>/<device>/cmd: parsing and checking, pure; a rate limit.

Each command is a JSON object with "cmd" and an optional "id" that the reply carries:
  {"cmd": "explain", "class": NAME_OR_ID, "frames": N}   CAM of that class in the next N results
  {"cmd": "snapshot"}                                    an overlay with the next result
  {"cmd": "set", "max_fps": 2, "publish": "change", ...} runtime knobs, within their config ranges
  {"cmd": "ping"}
Anything else gets an error reply naming the problem; nothing here can stop the loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from edgecam.core.errors import EdgecamError, shown
from edgecam.core.labels import class_id
from edgecam.device.config import LoopConfig, coerce

MAX_BYTES = 4096
MAX_FRAMES = 1000
SETTABLE = ("max_fps", "publish", "change_delta", "heartbeat", "overlay_every")


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
    if name == "ping" or name == "snapshot":
        _no_extra(obj, set())
        return Command(name, rid)
    if name == "explain":
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
    if name == "set":
        _no_extra(obj, set(SETTABLE))
        fields = {f.name: f for f in dataclasses.fields(LoopConfig)}
        changes = {}
        for key in SETTABLE:
            if key in obj:
                try:
                    changes[key] = coerce(obj[key], fields[key], key)
                except EdgecamError as exc:
                    raise CommandError(str(exc)) from None
        if not changes:
            raise CommandError(f"set needs one of {', '.join(SETTABLE)}")
        return Command("set", rid, changes=changes)
    if name is None:
        raise CommandError("no 'cmd'")
    raise CommandError(f"unknown command {shown(name)}; known: explain, snapshot, set, ping")


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
