"""MQTT contract v1: device ids, topics, the result JSON and its compressed heatmap. Pure functions.

Everything a consumer of edgecam's messages relies on is defined here once: the daemon,
its configuration, Home Assistant discovery, the dashboard and `edgecam watch` all use it.

The raw CAM (w x h floats) travels as an 8-bit grayscale PNG, min..max scaled to
0..255, base64 in the JSON; a consumer recovers it as min + (max - min) * p / 255.
A 7x7 map is about 100 bytes of PNG, so a whole result stays well under 1 KB.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from edgecam.core.errors import EdgecamError, shown

CONTRACT_VERSION = 1

# A device id is one topic level, the MQTT client id and part of Home Assistant's node and
# entity ids: letters, digits and _ . - fit all three everywhere, and 64 keeps every topic short.
MAX_DEVICE_ID = 64
DEVICE_ID_RULE = f"1 to {MAX_DEVICE_ID} characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
_DEVICE_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_DEVICE_ID - 1}}}")
# The prefix is one topic level too, but a deployment may already use any printable name for it.
MAX_PREFIX = 128
PREFIX_RULE = f"one MQTT topic level: 1 to {MAX_PREFIX} printable characters, no / + #, no surrounding spaces"
NESTED_PREFIX_RULE = (f"topic levels joined by /: 1 to {MAX_PREFIX} printable characters, no + #, no empty level, "
                      "no surrounding spaces")

# Topic names under <prefix>/<device>/.
RESULT = "result"
OVERLAY = "overlay"
STATUS = "status"
STATS = "stats"
CMD = "cmd"
CMD_REPLY = "cmd/reply"
TOPIC_NAMES = (RESULT, OVERLAY, STATUS, STATS, CMD, CMD_REPLY)
ANY_DEVICE = "+"  # the wildcard level, for subscribers


# Maps are 7x7 for MobileNetV2, or the size the config asks for; anything far bigger is not ours.
MAX_SIDE = 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)


class PayloadError(ValueError):
    """A payload that does not follow the contract."""


class ContractError(EdgecamError, ValueError):
    """A device id, prefix or topic that the contract does not allow; the message is one line."""


def is_device_id(text: object) -> bool:
    return isinstance(text, str) and _DEVICE_ID.fullmatch(text) is not None


def check_device_id(text: str, where: str = "device id") -> str:
    """The id itself, or ContractError naming `where` and the rule."""
    if not is_device_id(text):
        raise ContractError(f"{where}: {shown(text)} is not a device id ({DEVICE_ID_RULE})")
    return text


def device_id_from(name: str, fallback: str = "edgecam") -> str:
    """A device id made from any name (a host name): other characters become '-', cut to the rule's length."""
    text = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "-" for c in name)
    text = text.lstrip("_.-")[:MAX_DEVICE_ID]
    return text if is_device_id(text) else fallback


def is_prefix(text: object, nested: bool = False) -> bool:
    """A topic prefix: one level, or with `nested` (Home Assistant's discovery prefix) levels joined by '/'."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_PREFIX or not text.isprintable():
        return False
    levels = text.split("/") if nested else [text]
    return text.strip() == text and all(levels) and not any(c in text for c in ("+#" if nested else "/+#"))


def check_prefix(text: str, where: str = "prefix", nested: bool = False) -> str:
    if not is_prefix(text, nested):
        rule = NESTED_PREFIX_RULE if nested else PREFIX_RULE
        raise ContractError(f"{where}: {shown(text)} is not a usable topic prefix ({rule})")
    return text


def topic(prefix: str, device: str, name: str) -> str:
    """`<prefix>/<device>/<name>`; `device` may be ANY_DEVICE to subscribe to every device."""
    if name not in TOPIC_NAMES:
        raise ValueError(f"{name!r} is not a contract v1 topic name")
    return f"{prefix}/{device}/{name}"


def parse_topic(prefix: str, text: str) -> tuple[str, str] | None:
    """(device level, name) of a contract topic under `prefix`, or None for any other topic.

    The device level is returned as found: the caller decides what to do when it is not a device id.
    """
    head, sep, rest = text.partition("/")
    if not sep or head != prefix:
        return None
    device, sep, name = rest.partition("/")
    if not sep or name not in TOPIC_NAMES:
        return None
    return device, name


def encode_cam(cam: np.ndarray) -> dict[str, Any]:
    """The raw map as {w, h, min, max, png}."""
    if cam.ndim != 2 or cam.size == 0:
        raise ValueError(f"a CAM is a non-empty 2-D map, got shape {cam.shape}")
    lo, hi = float(cam.min()), float(cam.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("a CAM must be finite")
    span = hi - lo  # in float64: float32 would overflow for maps spanning over ~1.3e36
    pixels = (
        np.zeros(cam.shape, np.uint8)
        if span <= 0
        else np.rint((cam.astype(np.float64) - lo) * (255.0 / span)).astype(np.uint8)
    )
    import cv2  # here: the contract's names and checks serve `edgecam config`, which runs without OpenCV

    ok, png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise ValueError("PNG encoding failed")
    return {
        "w": int(cam.shape[1]),
        "h": int(cam.shape[0]),
        "min": round(lo, 6),
        "max": round(hi, 6),
        "png": base64.b64encode(png.tobytes()).decode("ascii"),
    }


def decode_cam(obj: dict[str, Any]) -> np.ndarray:
    """The raw map back from {w, h, min, max, png}, within one step (max - min) / 255."""
    try:
        data = base64.b64decode(obj["png"], validate=True)
        lo, hi, w, h = float(obj["min"]), float(obj["max"]), obj["w"], obj["h"]
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(f"cam: {' '.join(str(exc).split())[:120]}") from None
    for name, v in (("w", w), ("h", h)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
            raise PayloadError(f"cam: {name} must be a whole number from 1 to {MAX_SIDE}, got {shown(v)}")
    if not (abs(lo) <= FLOAT32_MAX and abs(hi) <= FLOAT32_MAX):
        raise PayloadError(f"cam: min and max must be finite 32-bit floats, got {shown(lo)} and {shown(hi)}")
    import cv2  # here, as in encode_cam

    try:
        # A PNG header can claim any size; OpenCV refuses the absurd ones with an exception.
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error:
        pixels = None
    if pixels is None or pixels.ndim != 2 or pixels.shape != (h, w) or pixels.dtype != np.uint8:
        raise PayloadError(f"cam: png is not an 8-bit {w}x{h} grayscale image")
    return (lo + (hi - lo) * pixels.astype(np.float64) / 255.0).astype(np.float32)


def iso_ms(ts: float) -> str:
    """UTC ISO 8601 with milliseconds: 2026-11-26T11:34:17.123Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def result_payload(
    *,
    device: str,
    boot: str,
    seq: int,
    ts: float,
    model: str,
    top: Sequence[tuple[int, str, float]],
    cam_id: int,
    cam_label: str,
    cam: np.ndarray,
    timing_ms: dict[str, float],
    extra_cams: Sequence[tuple[int, str, np.ndarray]] = (),
    clock: str | None = None,
) -> bytes:
    """One `.../result` message, compact JSON.

    `extra_cams` (classes a command asked for) go in an optional "cams" list of the
    same objects as "cam"; consumers of v1 that do not know the key ignore it. So does
    `clock`: "unsynced" when the device's wall clock was not set when `ts` was taken.
    """
    obj = {
        "v": CONTRACT_VERSION,
        "device": device,
        "boot": boot,
        "seq": int(seq),
        "ts": iso_ms(ts),
        "model": model,
        "top": [{"id": int(i), "label": lab, "score": round(float(s), 4)} for i, lab, s in top],
        "cam": {"id": int(cam_id), "label": cam_label, **encode_cam(cam)},
        "timing_ms": {k: round(float(v), 2) for k, v in timing_ms.items()},
    }
    if extra_cams:
        obj["cams"] = [{"id": int(i), "label": lab, **encode_cam(m)} for i, lab, m in extra_cams]
    if clock:
        obj["clock"] = clock
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def check_result(obj: Any) -> dict[str, Any]:
    """A contract v1 result, or PayloadError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise PayloadError("not a JSON object")
    if obj.get("v") != CONTRACT_VERSION or isinstance(obj.get("v"), bool):
        raise PayloadError(f"contract version {shown(obj.get('v'))}, this edgecam reads {CONTRACT_VERSION}")
    for key in ("device", "seq", "top", "cam"):
        if key not in obj:
            raise PayloadError(f"no {key!r}")
    if not is_device_id(obj["device"]):
        raise PayloadError(f"'device' {shown(obj['device'])} is not a device id")
    top = obj["top"]
    if not isinstance(top, list) or not top or not all(
        isinstance(t, dict) and isinstance(t.get("label"), str) and _number(t.get("score")) for t in top
    ):
        raise PayloadError("'top' is not a list of {label, score}")
    if not isinstance(obj["cam"], dict):
        raise PayloadError("'cam' is not an object")
    return obj


def _number(v: Any) -> bool:
    """A finite JSON number (a huge integer is not: it has no float)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def result_identity(payload: bytes) -> tuple[str, int] | None:
    """(boot, seq) of a result payload, or None when it is not one that says them."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    boot, seq = obj.get("boot"), obj.get("seq")
    if not isinstance(boot, str) or isinstance(seq, bool) or not isinstance(seq, int):
        return None
    return boot, seq


# How the run before a device's current one ended, as its stats say in "previous" (an additive key
# of v1): "clean" (stopped, its spool closed), "killed" (ended without a stop under the same kernel
# boot: nothing lost), "power_cut" (a new kernel boot: up to `lost_at_most` results after `last_seq`
# may be lost; an upper bound, at most the reservation the spool makes ahead of its results).
RUN_ENDS = ("clean", "killed", "power_cut")


MAX_EARLIER = 16  # runs a "previous" may carry in "earlier" (the spool keeps no more)


def check_previous(obj: Any, where: str = "previous") -> dict[str, Any] | None:
    """The "previous" of a stats message: None when absent, else the checked object or PayloadError."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise PayloadError(f"'{where}' is not an object")
    if not isinstance(obj.get("boot"), str) or len(obj["boot"]) > 64:
        raise PayloadError(f"'{where}.boot' is not a boot id")
    if obj.get("end") not in RUN_ENDS:
        raise PayloadError(f"'{where}.end' {shown(obj.get('end'))} is not one of {', '.join(RUN_ENDS)}")
    for key in ("last_seq", "lost_at_most"):
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PayloadError(f"'{where}.{key}' {shown(v)} is not a whole number, 0 or more")
    earlier = obj.get("earlier", [])
    if where == "previous":
        if not isinstance(earlier, list) or len(earlier) > MAX_EARLIER:
            raise PayloadError(f"'previous.earlier' is not a list of at most {MAX_EARLIER} runs")
        for e in earlier:
            check_previous(e, "previous.earlier[]")
    elif "earlier" in obj:
        raise PayloadError(f"'{where}' nests 'earlier'")
    return obj


def _run_end(run: dict[str, Any]) -> str | None:
    after = f"seq {run['last_seq']}" if run["last_seq"] else "its start"
    if run["end"] == "killed":
        return f"run {run['boot']} ended without a stop after {after}; nothing lost"
    if run["end"] == "power_cut":
        n = run["lost_at_most"]
        lost = f"up to {n} result{'s' if n != 1 else ''} lost after {after}" if n else "nothing lost"
        return f"run {run['boot']} ended by a power cut: {lost}"
    return None


def gap_text(previous: dict[str, Any] | None) -> str | None:
    """One line for a consumer about runs that did not stop cleanly (the previous one, and earlier ones whose
    report had not reached the broker); None when there are none (or it is unknown)."""
    if previous is None:
        return None
    first = _run_end(previous)
    parts = [f"previous {first}"] if first else []
    parts += [f"Earlier, {text} (not told before)" for e in previous.get("earlier", []) if (text := _run_end(e))]
    return ". ".join(parts) or None
