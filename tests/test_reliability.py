"""Nothing lost when the broker goes away, the daemon is killed, or the spool file is bad.

Real Mosquitto processes, the daemon as a process, the shared images as the camera.
The subscriber keeps a persistent session on a broker with persistence on, so what
the daemon delivers while the subscriber reconnects after a broker restart is kept.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Recorder
from conftest import IMAGES, cpu_seconds, wait_until

pytestmark = pytest.mark.usefixtures("model_cache")

FAST_RECONNECT = {"EDGECAM_MQTT_RECONNECT_MIN": "1", "EDGECAM_MQTT_RECONNECT_MAX": "2"}


def first_seen(results: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(boot, seq) in arrival order, duplicates (which QoS 1 allows) dropped."""
    seen: set[tuple[str, int]] = set()
    order = []
    for r in results:
        key = (r["boot"], r["seq"])
        if key not in seen:
            seen.add(key)
            order.append(key)
    return order


def count_results(rec: Recorder) -> int:
    return len(rec.on("result"))


def spooled(path: Path) -> list[tuple[str, int]]:
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'result' ORDER BY id").fetchall()
    finally:
        db.close()
    return [(json.loads(p)["boot"], json.loads(p)["seq"]) for (p,) in rows]


def test_broker_outage_loses_nothing_and_keeps_order(tmp_path: Path, daemons) -> None:
    broker = Broker(tmp_path / "broker", persist=True).start()
    rec = Recorder(broker.port, "edgecam/dev-o/result", client_id="rec-o", persistent=True)
    d = daemons("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", "dev-o",
                env=FAST_RECONNECT)
    try:
        assert rec.wait_for(lambda m: len(m) >= 5, 60), d.log()
        broker.stop()
        outage_start = time.time()
        time.sleep(21)
        assert d.proc.poll() is None, d.log()
        broker.start()
        # Everything made during the outage, then live results again.
        assert rec.wait_for(lambda m: len(m) >= 5 + 5 * 20, 60), d.log()
        d.proc.send_signal(signal.SIGTERM)
        assert d.wait(30) == 0, d.log()
        made = int(d.log().rsplit("frames, ", 1)[1].split(" results made")[0])
        # The daemon stopped once the broker had the last one; the broker still forwards it to us.
        assert rec.wait_for(lambda m: any(json.loads(p)["seq"] == made for _, p, _ in m), 30)
    finally:
        rec.close()
        broker.stop()
    order = first_seen(rec.results())
    boots = {b for b, _ in order}
    assert len(boots) == 1
    seqs = [s for _, s in order]
    # In order, and not one missing: 1, 2, 3, ... up to the last result the daemon made.
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    assert seqs[-1] == made
    during = [r for r in rec.results() if outage_start + 1 < _epoch(r["ts"]) < outage_start + 20]
    # 5 fps asked for; a busy machine may make fewer, but the outage must have had plenty to keep.
    assert len(during) >= 30, f"only {len(during)} results were made during the outage"
    log = d.log()
    assert "lost the connection" in log and "connected to 127.0.0.1" in log and "Traceback" not in log


def _epoch(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_sigkill_during_outage_then_restart_delivers_the_spool(tmp_path: Path, daemons) -> None:
    state = tmp_path / "state"
    env = {**FAST_RECONNECT, "EDGECAM_SPOOL_DIR": str(state)}
    broker = Broker(tmp_path / "broker", persist=True).start()
    rec = Recorder(broker.port, "edgecam/dev-s/result", client_id="rec-s", persistent=True)
    args = ("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", "dev-s")
    try:
        first = daemons(*args, env=env)
        assert rec.wait_for(lambda m: len(m) >= 5, 60), first.log()
        broker.stop()
        # At least 20 results spooled (4 s at 5 fps; longer on a busy machine), then the kill.
        assert wait_until(lambda: len(spooled(state / "spool-dev-s.db")) >= 20, 60, 0.1), first.log()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait()
        waiting = spooled(state / "spool-dev-s.db")
        assert len(waiting) >= 20
        broker.start()
        second = daemons(*args, env=env)
        assert rec.wait_for(lambda m: {(json.loads(p)["boot"], json.loads(p)["seq"]) for _, p, _ in m}
                            >= set(waiting), 60), second.log()
        # And the new process's own results after them.
        assert rec.wait_for(lambda m: len({json.loads(p)["boot"] for _, p, _ in m}) == 2, 30)
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.log()
        time.sleep(1)
    finally:
        rec.close()
        broker.stop()
    order = first_seen(rec.results())
    old_boot = order[0][0]
    old = [s for b, s in order if b == old_boot]
    # Everything the killed process made before it died: delivered live, or spooled and delivered now.
    assert old == list(range(1, len(old) + 1)), old
    assert old[-1] >= waiting[-1][1]
    # Old results first, then the new process's.
    boots = [b for b, _ in order]
    assert boots == sorted(boots, key=lambda b: b != old_boot)
    assert "waiting in" in second.log() or "from before are waiting" in second.log()


def test_sigterm_with_broker_away_keeps_results_for_the_next_start(tmp_path: Path, daemons) -> None:
    broker = Broker(tmp_path / "broker", persist=True).start()
    port = broker.port
    broker.stop()
    state = tmp_path / "state"
    env = {"EDGECAM_SPOOL_DIR": str(state)}
    d = daemons("--source", IMAGES, "--once", "--broker", f"127.0.0.1:{port}", "--device-id", "dev-t", env=env)
    assert d.wait(60) == 0, d.log()
    assert "wait in" in d.log() and "after the next start" in d.log()
    assert [s for _, s in spooled(state / "spool-dev-t.db")] == list(range(1, 9))
    broker.start()
    rec = Recorder(port, "edgecam/dev-t/result")
    try:
        again = daemons("--source", IMAGES, "--once", "--max-frames", "1", "--broker", f"127.0.0.1:{port}",
                        "--device-id", "dev-t", env=env)
        assert again.wait(60) == 0, again.log()
        assert rec.wait_for(lambda m: len(m) >= 9, 20)
    finally:
        rec.close()
        broker.stop()
    order = first_seen(rec.results())
    assert [s for _, s in order[:8]] == list(range(1, 9)) and order[8][1] == 1
    assert spooled(state / "spool-dev-t.db") == []


def test_corrupt_spool_is_moved_aside_and_live_results_flow(broker: Broker, tmp_path: Path, daemons) -> None:
    state = tmp_path / "state"
    state.mkdir()
    garbage = b"this is not an SQLite database " * 200
    (state / "spool-dev-c.db").write_bytes(garbage)
    rec = Recorder(broker.port, "edgecam/dev-c/result")
    d = daemons("--source", IMAGES, "--once", "--broker", broker.address, "--device-id", "dev-c",
                env={"EDGECAM_SPOOL_DIR": str(state)})
    assert d.wait(60) == 0, d.log()
    assert rec.wait_for(lambda m: len(m) >= 8, 10)
    rec.close()
    aside = [p for p in state.iterdir() if p.name.startswith("spool-dev-c.db.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    lines = [line for line in d.log().splitlines() if "corrupt" in line]
    assert len(lines) == 1 and "moved aside" in lines[0]


def test_full_disk_at_start_keeps_classifying_and_publishing(broker: Broker, tmp_path: Path, daemons) -> None:
    state = tmp_path / "full"
    state.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(state)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs as a full disk")
    try:
        fd = os.open(state / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # the disk is full: that is the point
        finally:
            os.close(fd)
        rec = Recorder(broker.port, "edgecam/dev-f/result")
        d = daemons("--source", IMAGES, "--once", "--broker", broker.address, "--device-id", "dev-f",
                    env={"EDGECAM_SPOOL_DIR": str(state)})
        assert d.wait(60) == 0, d.log()
        assert rec.wait_for(lambda m: len(m) >= 8, 30), d.log()
        rec.close()
        spool_lines = [line for line in d.log().splitlines() if line.startswith("ERROR spool:")]
        assert len(spool_lines) == 1, d.log()
        assert "in memory" in spool_lines[0]
        assert [s for _, s in first_seen(rec.results())] == list(range(1, 9))
    finally:
        subprocess.run(["umount", str(state)], check=False)


def test_missing_camera_runs_degraded_without_spinning(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, ["edgecam/dev-m/status", "edgecam/dev-m/stats"])
    d = daemons("--source", "/dev/video9", "--broker", broker.address, "--device-id", "dev-m")
    assert rec.wait_for(lambda m: b"degraded" in [p for t, p, _ in m if t.endswith("/status")], 30), d.log()
    assert rec.wait_for(lambda m: any(t.endswith("/stats") for t, _, _ in m), 30)
    stats = json.loads(rec.on("stats")[-1])
    assert stats["state"] == "degraded" and "/dev/video9" in stats["reason"] and stats["status"] == "degraded"
    start_cpu = cpu_seconds(d.proc.pid)
    time.sleep(4)
    assert cpu_seconds(d.proc.pid) - start_cpu < 1.0, "the daemon spins while the camera is missing"
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    tries = [line for line in d.log().splitlines() if "opening again in" in line]
    assert 2 <= len(tries) <= 8, d.log()
    rec.close()



def test_sighup_reloads_the_config_in_place(broker: Broker, daemons, tmp_path: Path) -> None:
    conf = tmp_path / "edgecam.toml"
    conf.write_text("[loop]\noverlay_every = 0\n")
    rec = Recorder(broker.port, "edgecam/dev-h/#")
    d = daemons("-c", conf, "--source", IMAGES, "--source-fps", "4", "--broker", broker.address,
                "--device-id", "dev-h")
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= 3, 60), d.log()
    assert rec.on("overlay") == []
    boot = rec.results()[0]["boot"]

    conf.write_text("[loop]\noverlay_every = banana\n")
    d.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration not reloaded" in d.log(), 30, 0.1), d.log()
    assert d.proc.poll() is None
    assert rec.results()[-1]["boot"] == boot

    conf.write_text("[loop]\noverlay_every = 1\n")
    d.proc.send_signal(signal.SIGHUP)
    assert rec.wait_for(lambda m: any(t.endswith("/overlay") for t, _, _ in m), 60), d.log()
    # A new boot: the process started over (the overlay, sent directly, may beat its result).
    assert rec.wait_for(lambda m: any(json.loads(p)["boot"] != boot for t, p, _ in m if t.endswith("/result")), 30)
    assert d.proc.poll() is None  # same process: re-executed in place
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    rec.close()
