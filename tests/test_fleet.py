"""The dashboard's fleet state (edgecam.web.fleet), fed real contract v1 payloads. Pure: no broker."""

from __future__ import annotations

import base64
import copy
import json
import math
from typing import Any

import cv2
import numpy as np
import pytest

from edgecam.contract import decode_cam, result_payload
from edgecam.web.fleet import HISTORY_SECONDS, MAX_DEVICES, MAX_JSON, Fleet

T0 = 1_780_000_000.0  # a wall clock in 2026
MODEL = "tf2_mobilenet_v2_1.0_224_ptq"
CAM = (np.arange(49, dtype=np.float32).reshape(7, 7) - 10.0) / 4.0
TOP = [(20, "chickadee", 0.8633), (19, "magpie", 0.0312), (21, "water ouzel, dipper", 0.0156)]


def result(device: str = "cam-1", seq: int = 1, label: str = "chickadee", score: float = 0.8633) -> bytes:
    """A real v1 result, as edgecam run publishes it."""
    top = [(20, label, score), *TOP[1:]]
    return result_payload(
        device=device, boot="9f2c41d0", seq=seq, ts=T0 + seq, model=MODEL, top=top, cam_id=20, cam_label=label,
        cam=CAM, timing_ms={"capture_age": 0.02, "pre": 0.61, "infer": 2.0, "cam": 0.08, "total": 2.71},
    )


def edited(payload: bytes, **changes: Any) -> bytes:
    """The payload with top-level keys replaced (a value of None deletes the key)."""
    obj = json.loads(payload)
    for key, value in changes.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return json.dumps(obj).encode()


def stats(device: str = "cam-1", fps: float = 2.0) -> bytes:
    return json.dumps({"v": 1, "device": device, "boot": "9f2c41d0", "state": "ok", "reason": "", "fps": fps,
                       "timing_ms": {"total": 3.1}, "model": MODEL}).encode()


def jpeg(value: int = 128) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), value, np.uint8))
    assert ok
    return buf.tobytes()


def devices(fleet: Fleet, now: float = T0 + 100) -> list[dict[str, Any]]:
    return fleet.snapshot(now, 30.0)["devices"]


# -- status ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["online", "degraded", "offline"])
def test_status_sets_the_device_status(status: str) -> None:
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1/status", status.encode(), T0) == "cam-1"
    device = fleet.devices["cam-1"]
    assert device.status == status and device.last_seen == T0
    assert device.result is None and fleet.bad == 0


def test_status_changes_follow_the_messages() -> None:
    fleet = Fleet()
    for i, status in enumerate(["online", "degraded", "online", "offline"]):
        fleet.ingest("edgecam/cam-1/status", status.encode(), T0 + i)
        assert fleet.devices["cam-1"].status == status
    assert fleet.bad == 0


@pytest.mark.parametrize("payload", [b"", b"ONLINE", b"up", b"on line", b"\xff\xfe", b"online!", b"1"])
def test_any_other_status_is_rejected_without_creating_a_device(payload: bytes) -> None:
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1/status", payload, T0) is None
    assert fleet.bad == 1 and fleet.devices == {}
    assert "cam-1" in fleet.last_bad


def test_a_bad_status_leaves_the_known_status() -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/status", b"degraded", T0)
    assert fleet.ingest("edgecam/cam-1/status", b"rebooting", T0 + 1) is None
    assert fleet.devices["cam-1"].status == "degraded" and fleet.devices["cam-1"].last_seen == T0
    assert fleet.bad == 1


# -- results and history --------------------------------------------------------------------


def test_a_valid_result_is_shown() -> None:
    fleet = Fleet()
    payload = result(seq=42)
    assert fleet.ingest("edgecam/cam-1/result", payload, T0 + 5) == "cam-1"
    assert fleet.bad == 0
    device = fleet.devices["cam-1"]
    assert device.last_result_at == T0 + 5 and device.last_seen == T0 + 5
    shown = device.to_json(T0 + 6, 30.0)
    r = shown["result"]
    assert r["seq"] == 42 and r["boot"] == "9f2c41d0" and r["model"] == MODEL
    assert [t["label"] for t in r["top"]] == ["chickadee", "magpie", "water ouzel, dipper"]
    assert [t["score"] for t in r["top"]] == [0.8633, 0.0312, 0.0156]
    assert [t["id"] for t in r["top"]] == [20, 19, 21]
    assert r["timing_ms"]["total"] == 2.71
    sent = json.loads(payload)
    assert r["ts"] == sent["ts"]
    assert r["cam"] == sent["cam"]  # id, label, w, h, min, max, png: as published
    assert base64.b64decode(r["cam"]["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_cam(r["cam"])
    step = (CAM.max() - CAM.min()) / 255
    assert back.shape == (7, 7) and np.abs(back - CAM).max() <= step / 2 + 1e-5
    assert shown["model"] == MODEL and shown["last_result_at"] == T0 + 5
    assert shown["history"] == [["chickadee", T0 + 5, T0 + 5, 0.8633]]
    # Nothing was said about the status: a result alone does not make a device online.
    assert shown["status"] == "unknown"


def test_only_five_top_entries_are_kept() -> None:
    obj = json.loads(result())
    obj["top"] = [{"id": i, "label": f"class {i}", "score": 1.0 / (i + 1)} for i in range(8)]
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1/result", json.dumps(obj).encode(), T0) == "cam-1"
    assert [t["label"] for t in fleet.devices["cam-1"].result["top"]] == [f"class {i}" for i in range(5)]


def test_the_same_label_in_a_row_is_one_run_and_a_new_label_starts_another() -> None:
    fleet = Fleet()
    for i, score in enumerate([0.5, 0.9, 0.7]):
        fleet.ingest("edgecam/cam-1/result", result(seq=i + 1, score=score), T0 + 5 * i)
    runs = [list(r) for r in fleet.devices["cam-1"].runs]
    assert runs == [["chickadee", T0, T0 + 10, 0.9]]  # first, last, best score

    fleet.ingest("edgecam/cam-1/result", result(seq=4, label="magpie", score=0.4), T0 + 12)
    fleet.ingest("edgecam/cam-1/result", result(seq=5, label="magpie", score=0.6), T0 + 14)
    fleet.ingest("edgecam/cam-1/result", result(seq=6, label="chickadee", score=0.8), T0 + 16)
    runs = [list(r) for r in fleet.devices["cam-1"].runs]
    assert runs == [
        ["chickadee", T0, T0 + 10, 0.9],
        ["magpie", T0 + 12, T0 + 14, 0.6],
        ["chickadee", T0 + 16, T0 + 16, 0.8],
    ]
    assert devices(fleet, T0 + 16)[0]["history"] == runs


def test_a_long_silence_starts_a_new_run_of_the_same_label() -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/result", result(seq=1), T0)
    fleet.ingest("edgecam/cam-1/result", result(seq=2), T0 + 120)
    assert [r[1:3] for r in fleet.devices["cam-1"].runs] == [[T0, T0], [T0 + 120, T0 + 120]]


def test_runs_older_than_the_history_window_are_dropped() -> None:
    assert HISTORY_SECONDS == 600
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/result", result(seq=1, label="magpie"), T0)
    fleet.ingest("edgecam/cam-1/result", result(seq=2, label="chickadee"), T0 + 30)
    fleet.ingest("edgecam/cam-1/result", result(seq=3, label="macaw"), T0 + 50)
    # 620 s after the first run ended: it goes; the one that ended 590 s ago stays.
    fleet.ingest("edgecam/cam-1/result", result(seq=4, label="daisy"), T0 + 620)
    assert [r[0] for r in fleet.devices["cam-1"].runs] == ["chickadee", "macaw", "daisy"]
    fleet.ingest("edgecam/cam-1/result", result(seq=5, label="hotdog"), T0 + 2000)
    assert [r[0] for r in fleet.devices["cam-1"].runs] == ["hotdog"]


def test_stats_of_the_device_are_shown() -> None:
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1/stats", stats(fps=3.5), T0) == "cam-1"
    shown = devices(fleet)[0]
    assert shown["fps"] == 3.5 and shown["state"] == "ok" and shown["timing_ms"] == {"total": 3.1}
    assert shown["stats_at"] == T0 and shown["model"] == MODEL


# -- rejected messages ----------------------------------------------------------------------


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _cam(**changes: Any) -> dict[str, Any]:
    cam = json.loads(result())["cam"]
    cam.update(changes)
    return cam


_8x7 = _png_b64(cv2.imencode(".png", np.zeros((7, 8), np.uint8))[1].tobytes())
_color = _png_b64(cv2.imencode(".png", np.zeros((7, 7, 3), np.uint8))[1].tobytes())

REJECTED: list[tuple[str, str, bytes]] = [
    ("not JSON", "edgecam/cam-1/result", b"not json"),
    ("not UTF-8", "edgecam/cam-1/result", b"\xff\xfe{}"),
    ("a JSON list", "edgecam/cam-1/result", json.dumps([json.loads(result(seq=2))]).encode()),
    ("a JSON string", "edgecam/cam-1/result", b'"hello"'),
    ("v=2", "edgecam/cam-1/result", edited(result(seq=2), v=2)),
    ("v missing", "edgecam/cam-1/result", edited(result(seq=2), v=None)),
    ("v=true", "edgecam/cam-1/result", edited(result(seq=2), v=True)),
    ("no top", "edgecam/cam-1/result", edited(result(seq=2), top=None)),
    ("empty top", "edgecam/cam-1/result", edited(result(seq=2), top=[])),
    ("top without scores", "edgecam/cam-1/result", edited(result(seq=2), top=[{"id": 1, "label": "x"}])),
    ("no cam", "edgecam/cam-1/result", edited(result(seq=2), cam=None)),
    ("cam not an object", "edgecam/cam-1/result", edited(result(seq=2), cam="iVBORw0KGgo=")),
    ("cam png not a PNG", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(png=_png_b64(b"hello world")))),
    ("cam png not base64", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(png="not base64!"))),
    ("cam png 8x7 said 7x7", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(png=_8x7))),
    ("cam w wrong", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(w=8))),
    ("cam h wrong", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(h=14))),
    ("cam png in colour", "edgecam/cam-1/result", edited(result(seq=2), cam=_cam(png=_color))),
    ("over 64 KiB", "edgecam/cam-1/result", edited(result(seq=2), pad="x" * MAX_JSON)),
    ("another device's result", "edgecam/cam-1/result", result(device="cam-2", seq=2)),
    ("device id with a space", "edgecam/bad id/result", result(device="bad id", seq=2)),
    ("device id of 100 chars", f"edgecam/{'d' * 100}/result", result(device="d" * 100, seq=2)),
    ("device id starting with a dot", "edgecam/.hidden/status", b"online"),
    ("device id empty", "edgecam//status", b"online"),
    ("device id with a plus", "edgecam/a+b/status", b"online"),
    ("stats of another device", "edgecam/cam-1/stats", stats(device="cam-2")),
    ("stats of v2", "edgecam/cam-1/stats", json.dumps({"v": 2, "device": "cam-1", "fps": 9.0}).encode()),
    ("stats not JSON", "edgecam/cam-1/stats", b"fps=2"),
    ("overlay not a JPEG", "edgecam/cam-1/overlay", cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()),
    ("overlay empty", "edgecam/cam-1/overlay", b""),
]


@pytest.mark.parametrize(("topic", "payload"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_bad_messages_are_counted_and_change_nothing(topic: str, payload: bytes) -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/status", b"online", T0)
    fleet.ingest("edgecam/cam-1/result", result(seq=1), T0)
    fleet.ingest("edgecam/cam-1/stats", stats(fps=2.0), T0)
    fleet.ingest("edgecam/cam-1/overlay", jpeg(), T0)
    before = copy.deepcopy(devices(fleet))
    assert fleet.bad == 0

    assert fleet.ingest(topic, payload, T0 + 50) is None
    assert fleet.bad == 1 and fleet.last_bad
    assert devices(fleet) == before
    assert list(fleet.devices) == ["cam-1"]
    assert fleet.devices["cam-1"].overlay == jpeg()
    assert fleet.snapshot(T0 + 100, 30.0)["bad_messages"] == 1


def test_the_size_limit_is_exact() -> None:
    base = result(seq=2)
    pad = MAX_JSON - len(edited(base, pad=""))
    just = edited(base, pad="x" * pad)
    assert len(just) == MAX_JSON
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1/result", just, T0) == "cam-1"
    assert fleet.ingest("edgecam/cam-1/result", edited(base, pad="x" * (pad + 1)), T0) is None
    assert fleet.bad == 1


@pytest.mark.parametrize("topic", ["edgecam/a/b/result", "other/x/result", "edgecam/cam-1", "edgecam",
                                   "edgecam/cam-1/cmd/reply", "edgecam/cam-1/cmd", "/edgecam/cam-1/result",
                                   "Edgecam/cam-1/result"])
def test_other_topics_are_ignored_not_counted(topic: str) -> None:
    fleet = Fleet()
    assert fleet.ingest(topic, result(seq=1), T0) is None
    assert fleet.bad == 0 and fleet.devices == {}


def test_another_prefix_is_ours_when_configured() -> None:
    fleet = Fleet("site9")
    assert fleet.ingest("edgecam/cam-1/status", b"online", T0) is None
    assert fleet.ingest("site9/cam-1/status", b"online", T0) == "cam-1"
    assert fleet.bad == 0


@pytest.mark.parametrize("dev", ["a", "A.b_c-9", "d" * 64])
def test_device_ids_that_are_valid(dev: str) -> None:
    fleet = Fleet()
    assert fleet.ingest(f"edgecam/{dev}/result", result(device=dev), T0) == dev


def test_a_device_id_with_a_trailing_newline_is_rejected() -> None:
    fleet = Fleet()
    assert fleet.ingest("edgecam/cam-1\n/status", b"online", T0) is None
    assert fleet.devices == {} and fleet.bad == 1


# -- limits ---------------------------------------------------------------------------------


def test_at_most_max_devices() -> None:
    fleet = Fleet()
    for i in range(MAX_DEVICES):
        assert fleet.ingest(f"edgecam/cam-{i:03d}/status", b"online", T0) == f"cam-{i:03d}"
    assert len(fleet.devices) == MAX_DEVICES and fleet.bad == 0

    for kind, payload in [("status", b"online"), ("result", result(device="one-too-many")),
                          ("stats", stats(device="one-too-many")), ("overlay", jpeg())]:
        assert fleet.ingest(f"edgecam/one-too-many/{kind}", payload, T0 + 1) is None
    assert fleet.bad == 4 and "one-too-many" not in fleet.devices
    assert len(fleet.devices) == MAX_DEVICES

    # The devices it has still update.
    assert fleet.ingest("edgecam/cam-000/status", b"degraded", T0 + 2) == "cam-000"
    assert fleet.ingest("edgecam/cam-255/result", result(device="cam-255", seq=7), T0 + 2) == "cam-255"
    assert fleet.devices["cam-000"].status == "degraded"
    assert fleet.devices["cam-255"].result["seq"] == 7
    assert fleet.bad == 4


# -- to_json and snapshot --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "age", "stale"),
    [
        ("online", 31.0, True),
        ("online", 10.0, False),
        ("degraded", 31.0, True),
        ("degraded", 10.0, False),
        ("offline", 3600.0, False),
        ("offline", 10.0, False),
    ],
)
def test_stale(status: str, age: float, stale: bool) -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/result", result(), T0)
    fleet.ingest("edgecam/cam-1/status", status.encode(), T0)
    assert fleet.devices["cam-1"].to_json(T0 + age, 30.0)["stale"] is stale


def test_an_online_device_that_never_sent_a_result_is_stale() -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/status", b"online", T0)
    shown = fleet.devices["cam-1"].to_json(T0, 30.0)
    assert shown["stale"] is True and shown["result"] is None and shown["last_result_at"] is None


def test_overlay_is_its_sequence_number() -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/status", b"online", T0)
    assert fleet.devices["cam-1"].to_json(T0, 30.0)["overlay"] is None
    first, second = jpeg(10), jpeg(200)
    assert fleet.ingest("edgecam/cam-1/overlay", first, T0 + 1) == "cam-1"
    assert fleet.devices["cam-1"].to_json(T0 + 1, 30.0)["overlay"] == 1
    assert fleet.devices["cam-1"].overlay == first
    assert fleet.ingest("edgecam/cam-1/overlay", second, T0 + 2) == "cam-1"
    assert fleet.devices["cam-1"].to_json(T0 + 2, 30.0)["overlay"] == 2
    assert fleet.devices["cam-1"].overlay == second
    assert fleet.devices["cam-1"].last_seen == T0 + 2


def test_snapshot_sorts_devices_and_counts_bad_messages() -> None:
    fleet = Fleet()
    for dev in ["c-cam", "a-cam", "b-cam"]:
        fleet.ingest(f"edgecam/{dev}/status", b"online", T0)
    fleet.ingest("edgecam/b-cam/result", b"[]", T0)
    fleet.ingest("edgecam/b-cam/status", b"sleeping", T0)
    snap = fleet.snapshot(T0 + 1, 45.0)
    assert [d["id"] for d in snap["devices"]] == ["a-cam", "b-cam", "c-cam"]
    assert snap["bad_messages"] == 2 and snap["now"] == T0 + 1 and snap["stale_after"] == 45.0
    json.dumps(snap, allow_nan=False)  # what the dashboard sends is JSON


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "payload",
    [
        result(seq=2).replace(b'"score":0.8633', b'"score":NaN'),
        result(seq=2).replace(b'"score":0.8633', b'"score":1e999'),
        edited(result(seq=2), cam=_cam(min=-math.inf)),
    ],
    ids=["score NaN", "score 1e999", "cam min -Infinity"],
)
def test_non_finite_numbers_never_reach_the_snapshot(payload: bytes) -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/result", result(seq=1), T0)
    fleet.ingest("edgecam/cam-1/result", payload, T0 + 1)
    json.dumps(fleet.snapshot(T0 + 2, 30.0), allow_nan=False)


def test_an_overlay_is_shown_only_while_it_is_as_new_as_the_result() -> None:
    fleet = Fleet()
    fleet.ingest("edgecam/cam-1/result", result(seq=1), T0)
    fleet.ingest("edgecam/cam-1/overlay", jpeg(), T0 + 0.1)  # the overlay of result 1, just after it
    assert devices(fleet, T0 + 1)[0]["overlay_fresh"] is True
    fleet.ingest("edgecam/cam-1/result", result(seq=2), T0 + 1.0)
    assert devices(fleet, T0 + 1)[0]["overlay_fresh"] is True  # within the 1.5 s of one frame's pair
    fleet.ingest("edgecam/cam-1/result", result(seq=3, label="magpie"), T0 + 3.0)
    # Result 3's labels must not sit under result 1's picture.
    assert devices(fleet, T0 + 3)[0]["overlay_fresh"] is False
    assert devices(fleet, T0 + 3)[0]["overlay"] == 1
