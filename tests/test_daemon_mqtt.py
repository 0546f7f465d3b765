"""`edgecam run` end to end: the shared images in, contract v1 out through a real Mosquitto."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from broker import Broker, Recorder, free_port, publish
from conftest import EXPECTED, IMAGES, ROOT, SCORE_TOLERANCE, cpu_seconds, one_error_line, run_cli, wait_until

from edgecam.contract import decode_cam
from edgecam.device.spool import Quota, Spool

pytestmark = pytest.mark.usefixtures("model_cache")

IMAGE_NAMES = sorted(p.name for p in IMAGES.iterdir() if p.suffix.lower() in {".jpg", ".bmp", ".png"})
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def contract_keys(section: str) -> set[str]:
    """The keys docs/mqtt-contract.md lists for a section of the stats message."""
    doc = (ROOT / "docs" / "mqtt-contract.md").read_text()
    found = re.search(rf'"{section}": \{{([^}}]*)\}}', doc)
    assert found, section
    return set(re.findall(r'"(\w+)"', found.group(1)))


def explain_json() -> dict[str, dict[str, Any]]:
    proc = run_cli("explain", "--json", IMAGES)
    assert proc.returncode == 0, proc.stderr
    return {Path(o["image"]).name: o for o in map(json.loads, proc.stdout.splitlines())}


def check_schema(r: dict[str, Any], device: str) -> None:
    assert set(r) >= {"v", "device", "boot", "seq", "ts", "model", "top", "cam", "timing_ms"}
    assert r["v"] == 1 and r["device"] == device
    assert re.fullmatch(r"[0-9a-f]{8}", r["boot"])
    assert ISO_MS.match(r["ts"]), r["ts"]
    assert r["model"] == "tf2_mobilenet_v2_1.0_224_ptq"
    assert len(r["top"]) == 3
    assert all(set(t) == {"id", "label", "score"} for t in r["top"])
    scores = [t["score"] for t in r["top"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] >= 0 and scores[0] <= 1
    assert set(r["cam"]) == {"id", "label", "w", "h", "min", "max", "png"}
    assert r["cam"]["id"] == r["top"][0]["id"] and r["cam"]["label"] == r["top"][0]["label"]
    assert set(r["timing_ms"]) == {"capture_age", "pre", "infer", "cam", "total"}
    assert all(v >= 0 for v in r["timing_ms"].values())


def test_every_result_arrives_and_matches_explain(broker: Broker, daemons, tmp_path: Path) -> None:
    conf = tmp_path / "edgecam.toml"
    # Overlays go out only while connected unless spooled; the first frame can beat the connection.
    conf.write_text("[loop]\noverlay_every = 1\noverlay_width = 256\noverlay_height = 192\n"
                    "[spool]\noverlays = true\n")
    rec = Recorder(broker.port, "edgecam/dev-a/#")
    d = daemons("-c", conf, "--source", IMAGES, "--once", "--broker", broker.address, "--device-id", "dev-a")
    assert d.wait() == 0, d.log()
    assert rec.wait_for(lambda m: sum(t.endswith("/status") for t, _, _ in m) >= 2, 10)
    results = rec.results()
    rec.close()

    assert [r["seq"] for r in results] == list(range(1, len(IMAGE_NAMES) + 1))
    assert len({r["boot"] for r in results}) == 1
    expected = explain_json()
    for name, r in zip(IMAGE_NAMES, results, strict=True):
        check_schema(r, "dev-a")
        want = expected[name]
        assert [t["id"] for t in r["top"]] == [t["id"] for t in want["top"]], name
        for got, ref in zip(r["top"], want["top"], strict=True):
            assert got["label"] == ref["label"]
            assert abs(got["score"] - ref["score"]) < 1e-3
        ref_map = np.array(want["cams"][0]["map"], np.float32)
        got_map = decode_cam(r["cam"])
        step = (r["cam"]["max"] - r["cam"]["min"]) / 255
        assert got_map.shape == ref_map.shape == (7, 7)
        # One PNG quantization step, plus the 1e-5 rounding of explain's JSON and the 1e-6 of min/max.
        assert np.max(np.abs(got_map - ref_map)) <= step / 2 + 2e-5, name
        assert len(json.dumps(r, separators=(",", ":"))) < 1024

    overlays = rec.on("overlay")
    assert len(overlays) == len(IMAGE_NAMES)
    for jpeg in overlays:
        assert jpeg[:2] == b"\xff\xd8"
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (192, 256, 3)

    statuses = rec.on("status")
    assert statuses[0] == b"online" and statuses[-1] == b"offline"
    stats = json.loads(rec.on("stats")[-1])
    assert stats["frames"]["processed"] == len(IMAGE_NAMES)
    assert stats["frames"]["published"] == len(IMAGE_NAMES)
    assert stats["runtime"] and stats["model"] == "tf2_mobilenet_v2_1.0_224_ptq"
    assert {"pre", "infer", "cam", "encode", "total"} <= set(stats["timing_ms"])
    # stats.spool is what the spool counts (one list of names, in device/spool.py) and the results
    # in flight, and the contract says exactly those.
    kinds = {"result": Quota(1, 1, "drop_oldest"), "overlay": Quota(1, 1, "drop_oldest")}
    assert set(stats["spool"]) == {"inflight", *Spool(None, kinds).counts()} == contract_keys("spool")

    # What a dashboard that connects later sees: the retained status and stats.
    late = Recorder(broker.port, ["edgecam/dev-a/status", "edgecam/dev-a/stats"])
    assert late.wait_for(lambda m: len(m) >= 2, 10)
    assert all(retained for _, _, retained in late.messages)
    assert late.on("status") == [b"offline"]
    late.close()


def test_sigkill_leaves_offline_by_last_will(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, "edgecam/dev-k/#")
    d = daemons("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", "dev-k")
    assert rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _ in m), 60), d.log()
    assert rec.on("status") == [b"online"]
    os.kill(d.proc.pid, signal.SIGKILL)
    d.wait()
    assert rec.wait_for(lambda m: [p for t, p, _ in m if t.endswith("/status")][-1] == b"offline", 15)
    rec.close()
    late = Recorder(broker.port, "edgecam/dev-k/status")
    assert late.wait_for(lambda m: len(m) >= 1, 10)
    assert late.on("status") == [b"offline"]
    late.close()


def test_sigterm_stops_cleanly(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, "edgecam/dev-t/#")
    d = daemons("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", "dev-t")
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= 2, 60), d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert rec.wait_for(lambda m: [p for t, p, _ in m if t.endswith("/status")][-1] == b"offline", 10)
    log = d.log()
    assert "SIGTERM: stopping" in log and "Traceback" not in log
    # Every result the daemon counted reached the broker.
    seqs = [r["seq"] for r in rec.results()]
    assert seqs == list(range(1, len(seqs) + 1))
    rec.close()


def test_unreachable_broker_retries_then_delivers(tmp_path: Path, daemons) -> None:
    port = free_port()
    env = {"EDGECAM_MQTT_RECONNECT_MIN": "1", "EDGECAM_MQTT_RECONNECT_MAX": "2"}
    d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", f"127.0.0.1:{port}", "--device-id", "dev-u",
                env=env)
    # Count from the first try: start-up (model, source) takes its own time on a busy machine.
    assert wait_until(lambda: "cannot reach" in d.log() or d.proc.poll() is not None, 90, 0.1), d.log()
    cpu0 = cpu_seconds(d.proc.pid)
    time.sleep(6)
    assert d.proc.poll() is None, d.log()
    log = d.log()
    tries = [line for line in log.splitlines() if "cannot reach" in line]
    # One line per backoff step (1 s, then 2 s, 2 s...): a handful in 6 s, not a flood.
    assert 1 <= len(tries) <= 6, log
    assert f"127.0.0.1:{port}" in tries[0] and "retrying in" in tries[0]
    assert "Traceback" not in log
    cpu = cpu_seconds(d.proc.pid) - cpu0
    # ~4 small frames a second and a reconnect now and then: far from a spinning core.
    assert cpu < 3.0, f"{cpu:.1f} s of CPU in 6 s"

    broker = Broker(tmp_path / "late", port=port).start()
    try:
        rec = Recorder(port, "edgecam/dev-u/#")
        assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= 3, 30), d.log()
        assert b"online" in rec.on("status")
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log()
        assert "connected to 127.0.0.1" in d.log()
        rec.close()
    finally:
        broker.stop()



def test_publish_on_change_and_heatmap_size(broker: Broker, daemons, tmp_path: Path) -> None:
    folder = tmp_path / "same"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.bmp").write_bytes((IMAGES / "cat.bmp").read_bytes())
    (folder / "5.jpg").write_bytes((IMAGES / "parrot.jpg").read_bytes())
    conf = tmp_path / "c.toml"
    conf.write_text('[loop]\npublish = "change"\nheartbeat = 600\nheatmap_width = 14\nheatmap_height = 14\n')
    rec = Recorder(broker.port, "edgecam/dev-c/#")
    d = daemons("-c", conf, "--source", folder, "--once", "--broker", broker.address, "--device-id", "dev-c")
    assert d.wait() == 0, d.log()
    assert rec.wait_for(lambda m: b"offline" in [p for t, p, _ in m if t.endswith("/status")], 10)
    results = rec.results()
    # The cat five times is one result; the parrot is a change.
    assert [r["top"][0]["label"] for r in results] == ["Egyptian cat", "macaw"]
    assert [r["seq"] for r in results] == [1, 2]
    assert (results[0]["cam"]["w"], results[0]["cam"]["h"]) == (14, 14)
    assert decode_cam(results[0]["cam"]).shape == (14, 14)
    stats = json.loads(rec.on("stats")[-1])
    assert stats["frames"]["processed"] == 6 and stats["frames"]["published"] == 2
    rec.close()


def test_mqtt_v5_and_custom_prefix(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, "site9/dev-5/#")
    d = daemons("--source", IMAGES, "--once", "--max-frames", "2", "--broker", broker.address,
                "--device-id", "dev-5", "--prefix", "site9", env={"EDGECAM_MQTT_PROTOCOL": "5"})
    assert d.wait() == 0, d.log()
    assert rec.wait_for(lambda m: b"offline" in [p for t, p, _ in m if t.endswith("/status")], 10)
    assert [r["seq"] for r in rec.results()] == [1, 2]
    rec.close()


def test_no_mqtt_prints_json_lines(daemons) -> None:
    d = daemons("--source", IMAGES, "--once", "--no-mqtt")
    out, _ = d.proc.communicate(timeout=120)
    assert d.wait() == 0, d.log()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(IMAGE_NAMES) + 1))
    assert lines[IMAGE_NAMES.index("parrot.jpg")]["top"][0]["label"] == "macaw"


def test_no_mqtt_ends_quietly_when_its_reader_goes() -> None:
    # `edgecam run --no-mqtt | head -1`: the finisher's write fails; no traceback, exit 0 as for explain.
    import subprocess
    import sys

    from conftest import ROOT

    run = subprocess.Popen([sys.executable, "-m", "edgecam", "run", "--source", str(IMAGES), "--no-mqtt"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert run.stdout is not None and run.stderr is not None
    assert json.loads(run.stdout.readline())["seq"] == 1
    run.stdout.close()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()


def test_watch_prints_lines_heatmaps_and_survives_bad_payloads(broker: Broker, daemons) -> None:
    import subprocess
    import sys

    from conftest import ROOT

    watch = subprocess.Popen(
        [sys.executable, "-m", "edgecam", "watch", "-b", broker.address, "--heatmap", "-n", "3", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    # Wait until watch is subscribed (it says so on stderr) before anything is published.
    assert "watching" in watch.stderr.readline()
    publish(broker.port, "edgecam/junk/result", b"not json")
    publish(broker.port, "edgecam/junk/result", json.dumps({"v": 2, "device": "junk"}))
    publish(broker.port, "edgecam/junk/result", b"{" * 300_000)
    d = daemons("--source", IMAGES, "--once", "--max-frames", "3", "--broker", broker.address, "--device-id", "dev-w")
    assert d.wait() == 0, d.log()
    out, err = watch.communicate(timeout=90)
    assert watch.returncode == 0, err
    lines = [line for line in out.splitlines() if line.startswith("dev-w #")]
    assert [line.split()[1] for line in lines] == ["#1", "#2", "#3"]
    # bird.bmp, first by name: the shared README's label and score.
    label, score = EXPECTED["tf2_mobilenet_v2_1.0_224_ptq"]["bird.bmp"]
    first = lines[0].split("  ")[1].split(" | ")[0]
    assert first.startswith(label + " ") and abs(float(first.rsplit(" ", 1)[1]) - score) <= SCORE_TOLERANCE
    assert out.count("  CAM of ") == 3
    shade_rows = [line for line in out.splitlines() if line.startswith("  ") and "CAM of" not in line]
    assert len(shade_rows) == 21 and all(len(r) == 16 for r in shade_rows)
    assert "█" in out
    assert err.count("bad result") == 3 and "Traceback" not in err
    assert "contract version 2" in err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--source", "missing-clip.mp4"], ["missing-clip.mp4", "no such file"]),
        (["--source", "auto"], ["no camera found", "picamera2", "V4L2"]),
        (["--broker", "localhost:0"], ["--broker", "port"]),
        (["--max-frames", "-1"], ["--max-frames"]),
    ],
)
def test_set_up_errors_are_one_line(args: list[str], needles: list[str]) -> None:
    if args == ["--source", "auto"] and Path("/dev/video0").exists():
        pytest.skip("this machine has a camera")
    proc = run_cli("run", *args, timeout=120)
    assert proc.returncode == 2
    one_error_line(proc, *needles)


def test_bad_config_file_is_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "edgecam.toml"
    conf.write_text('[loop]\nmax_fps = "fast"\n')
    proc = run_cli("run", "-c", conf, "--source", IMAGES)
    assert proc.returncode == 2
    one_error_line(proc, str(conf), "loop.max_fps", "expected a number")


def test_folder_of_unreadable_images_fails_once(tmp_path: Path, daemons) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "b.png").write_bytes(b"")
    d = daemons("--source", folder, "--once", "--no-mqtt")
    assert d.wait() == 1
    log = d.log()
    assert "no image could be decoded (a.jpg, b.png)" in log and "ended before any frame was used" in log
    assert "Traceback" not in log


def test_a_set_up_error_stays_one_line_with_results_waiting(tmp_path: Path) -> None:
    from edgecam.device.spool import Quota, Spool

    state = tmp_path / "state"
    spool = Spool(state / "spool-dev-w.db", {"result": Quota(10**6, 3600), "overlay": Quota(10**6, 3600)})
    spool.append("result", "edgecam/dev-w/result", b"{}", 1)
    spool.close()
    proc = run_cli("run", "--source", tmp_path / "missing-dir", "--device-id", "dev-w",
                   env={"EDGECAM_SPOOL_DIR": str(state)})
    assert proc.returncode == 2
    one_error_line(proc, "missing-dir")


def test_a_frozen_broker_is_reported_as_silent_not_as_a_certificate_problem(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, "edgecam/frozen/result")
    env = {"EDGECAM_MQTT_KEEPALIVE": "5", "EDGECAM_MQTT_RECONNECT_MIN": "1", "EDGECAM_MQTT_RECONNECT_MAX": "2"}
    d = daemons("--source", IMAGES, "--source-fps", "4", "--broker", broker.address, "--device-id", "frozen", env=env)
    try:
        assert rec.wait_for(lambda m: len(m) >= 2, 90), d.log()
        assert broker.proc is not None
        # Stopped, not killed: its sockets stay open and accept connections that nothing answers.
        broker.proc.send_signal(signal.SIGSTOP)
        lost = "lost the connection to " + broker.address + " (no answer within the keepalive, 5 s)"
        assert wait_until(lambda: lost in d.log(), 60, 0.1), d.log()
        # Reconnecting: the TCP connection opens (the kernel accepts it), the CONNECT goes unanswered.
        silent = f"no answer from {broker.address} within the keepalive (5 s) after the connection opened"
        assert wait_until(lambda: silent in d.log(), 60, 0.1), d.log()
        assert "client certificate" not in d.log()
        assert all("retrying in" in line for line in d.log().splitlines() if silent in line)
    finally:
        broker.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    # Woken up, it gets the device back, and with it everything made while it was frozen.
    assert wait_until(lambda: "after" in d.log().split(silent)[-1] and "connected to" in d.log().split(silent)[-1],
                      60, 0.1), d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.log()
    made = int(re.search(r"(\d+) results made", d.log()).group(1))  # type: ignore[union-attr]
    assert "messages wait in" not in d.log() and "they are lost" not in d.log(), d.log()
    assert rec.wait_for(lambda m: {json.loads(p)["seq"] for _, p, _ in m} == set(range(1, made + 1)), 30), d.log()
    rec.close()
