"""What the dashboard knows about each device, built from contract v1 messages. Pure: no I/O.

Every message is checked before it changes anything: a malformed result, a payload too
large, another contract version, a device id that cannot be one, or a result whose
"device" is not its topic's is counted and dropped, never shown and never fatal.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edgecam.contract import (
    CONTRACT_VERSION,
    OVERLAY,
    RESULT,
    STATS,
    STATUS,
    PayloadError,
    check_previous,
    check_result,
    decode_cam,
    gap_text,
    is_device_id,
    parse_topic,
)
from edgecam.core.errors import shown

MAX_DEVICES = 256
MAX_JSON = 64 * 1024
MAX_OVERLAY = 4 * 1024 * 1024
HISTORY_SECONDS = 600.0
FORGET_AFTER_S = 3600.0  # a full table gives the place of a device silent this long to a new one
MAX_RUNS = 300
OVERLAY_FRESH_S = 1.5
STATUSES = ("online", "degraded", "offline")


@dataclass
class Device:
    id: str
    status: str = "unknown"
    last_seen: float = 0.0  # wall clock of the last message of any kind
    last_result_at: float = 0.0
    result: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    # [label, first, last, best score], oldest first; a top-1 that flickers still stays small.
    runs: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=MAX_RUNS))
    overlay: bytes | None = None
    overlay_seq: int = 0
    overlay_at: float = 0.0

    def to_json(self, now: float, stale_after: float) -> dict[str, Any]:
        stats = self.stats or {}
        stale = self.status in ("online", "degraded") and (
            not self.last_result_at or now - self.last_result_at > stale_after
        )
        return {
            "id": self.id,
            "status": self.status,
            "stale": stale,
            "last_seen": self.last_seen or None,
            "last_result_at": self.last_result_at or None,
            "result": self.result,
            "fps": stats.get("fps"),
            "state": stats.get("state"),
            "reason": stats.get("reason"),
            "timing_ms": stats.get("timing_ms"),
            "stats_at": stats.get("_at"),
            "gap": stats.get("gap"),
            "model": (self.result or {}).get("model") or stats.get("model"),
            "history": list(self.runs),
            "overlay": self.overlay_seq or None,
            "overlay_at": self.overlay_at or None,
            # An overlay is a picture of one frame: shown only while it is about as new as the latest
            # result, so labels of one frame never sit under the picture of another.
            "overlay_fresh": bool(self.overlay) and self.last_result_at - self.overlay_at <= OVERLAY_FRESH_S,
        }


class Fleet:
    def __init__(self, prefix: str = "edgecam") -> None:
        self.prefix = prefix
        self.devices: dict[str, Device] = {}
        self.bad = 0
        self.last_bad = ""

    def _reject(self, topic: str, why: str) -> None:
        self.bad += 1
        self.last_bad = f"{topic[:120]}: {why[:200]}"

    def ingest(self, topic: str, payload: bytes, now: float) -> str | None:
        """Take one message; returns the id of the device it changed, or None."""
        parsed = parse_topic(self.prefix, topic)
        if parsed is None:
            return None  # not a topic of ours (the subscription is <prefix>/+/<kind>)
        dev, kind = parsed
        if kind not in (STATUS, RESULT, STATS, OVERLAY):
            return None  # commands and replies are not fleet state
        if not is_device_id(dev):
            self._reject(topic, "not a device id")
            return None
        try:
            if kind == STATUS:
                text = payload.decode("ascii", "replace").strip()
                if text not in STATUSES:
                    raise PayloadError(f"status {text[:20]!r} is not one of {', '.join(STATUSES)}")
                device = self._device(dev, now)
                device.status = text
            elif kind == RESULT:
                result = self._result(dev, payload)
                device = self._device(dev, now)
                device.result = result
                device.last_result_at = now
                self._remember(device, result, now)
            elif kind == STATS:
                stats = self._json(payload)
                if stats.get("v") != CONTRACT_VERSION or stats.get("device") != dev:
                    raise PayloadError("not a v1 stats message of this device")
                try:
                    gap = gap_text(check_previous(stats.get("previous")))
                except PayloadError as exc:
                    # An additive field gone wrong does not hide the device's fps and state.
                    self._reject(topic, f"{exc}; the rest of the stats kept")
                    gap = None
                device = self._device(dev, now)
                device.stats = {k: stats.get(k) for k in ("fps", "state", "reason", "timing_ms", "model")}
                device.stats["gap"] = gap
                device.stats["_at"] = now
            else:  # OVERLAY
                if not payload.startswith(b"\xff\xd8") or len(payload) > MAX_OVERLAY:
                    raise PayloadError("not a JPEG, or too large")
                device = self._device(dev, now)
                device.overlay = bytes(payload)
                device.overlay_seq += 1
                device.overlay_at = now
        except PayloadError as exc:
            self._reject(topic, str(exc))
            return None
        device.last_seen = now
        return dev

    def _device(self, dev: str, now: float) -> Device:
        """The device, made once its first message has been checked. When the table is full, a new
        device takes the place of the longest-silent one that is offline or silent for
        FORGET_AFTER_S: a retired device's retained `offline` must not lock out a new one forever."""
        if dev not in self.devices:
            if len(self.devices) >= MAX_DEVICES:
                gone = [d for d in self.devices.values() if d.status == "offline" or now - d.last_seen > FORGET_AFTER_S]
                if not gone:
                    raise PayloadError(f"more than {MAX_DEVICES} devices, none of them offline or silent")
                del self.devices[min(gone, key=lambda d: d.last_seen).id]
            self.devices[dev] = Device(dev)
        return self.devices[dev]

    @staticmethod
    def _json(payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_JSON:
            raise PayloadError(f"{len(payload)} bytes, over {MAX_JSON}")
        try:
            # NaN and Infinity are not JSON; Python accepts them, a browser's JSON.parse does not.
            obj = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)
        except (UnicodeDecodeError, ValueError):
            raise PayloadError("not JSON (or numbers that are not finite)") from None
        except RecursionError:
            raise PayloadError("JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise PayloadError("not a JSON object")
        return obj

    def _result(self, dev: str, payload: bytes) -> dict[str, Any]:
        obj = check_result(self._json(payload))
        if obj["device"] != dev:
            raise PayloadError(f"result of device {shown(obj['device'])} on {dev}'s topic")
        cam = obj["cam"]
        decode_cam(cam)  # a map that does not decode is not shown
        top = [
            {"id": t.get("id"), "label": str(t["label"])[:200], "score": float(t["score"])} for t in obj["top"][:5]
        ]
        return {
            "seq": obj.get("seq"),
            "boot": obj.get("boot"),
            "ts": obj.get("ts"),
            "model": obj.get("model"),
            "top": top,
            "cam": {k: cam[k] for k in ("id", "label", "w", "h", "min", "max", "png") if k in cam},
            "timing_ms": obj.get("timing_ms") if isinstance(obj.get("timing_ms"), dict) else None,
        }

    @staticmethod
    def _remember(device: Device, result: dict[str, Any], now: float) -> None:
        """The top-1 label over time, as runs of the same label, for the timeline."""
        label, score = result["top"][0]["label"], result["top"][0]["score"]
        runs = device.runs
        if runs and runs[-1][0] == label and now - runs[-1][2] < 60:
            runs[-1][2] = now
            runs[-1][3] = max(runs[-1][3], score)
        else:
            runs.append([label, now, now, score])
        while runs and now - runs[0][2] > HISTORY_SECONDS:
            runs.popleft()

    def snapshot(self, now: float, stale_after: float) -> dict[str, Any]:
        return {
            "now": now,
            "stale_after": stale_after,
            "bad_messages": self.bad,
            "devices": [d.to_json(now, stale_after) for d in sorted(self.devices.values(), key=lambda d: d.id)],
        }


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is not a finite number")
    return value
