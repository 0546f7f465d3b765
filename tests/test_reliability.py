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
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import smallfs
from broker import Broker, Recorder
from conftest import IMAGES, ROOT, cpu_seconds, wait_until
from spoolfiles import damage, leaves_of, spooled_seqs

from edgecam.contract import check_result
from edgecam.device.clock import clock_synced
from edgecam.device.spool import Quota, Spool

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


def test_broker_outage_loses_nothing_and_keeps_order(tmp_path: Path, daemons) -> None:
    broker = Broker(tmp_path / "broker", persist=True).start()
    rec = Recorder(broker.port, "edgecam/dev-o/result", client_id="rec-o", persistent=True)
    d = daemons("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", "dev-o",
                env=FAST_RECONNECT)
    try:
        assert rec.wait_for(lambda m: len(m) >= 5, 60), d.log()
        broker.stop()
        outage_start = time.time()
        # An outage of 20 s, and the daemon live through it: its results pile up in the spool.
        spool = tmp_path / "state" / "spool-dev-o.db"
        assert wait_until(lambda: time.time() - outage_start >= 20 and len(spooled_seqs(spool)) >= 40, 90, 0.2), d.log()
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
        assert wait_until(lambda: len(spooled_seqs(state / "spool-dev-s.db")) >= 20, 60, 0.1), first.log()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait()
        waiting = spooled_seqs(state / "spool-dev-s.db")
        assert len(waiting) >= 20
        broker.start()
        second = daemons(*args, env=env)
        assert rec.wait_for(lambda m: {(json.loads(p)["boot"], json.loads(p)["seq"]) for _, p, _ in m}
                            >= set(waiting), 60), second.log()
        # And the new process's own results after them.
        assert rec.wait_for(lambda m: len({json.loads(p)["boot"] for _, p, _ in m}) == 2, 30)
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.log()
        made = int(second.log().rsplit("frames, ", 1)[1].split(" results made")[0])
        # The new process's last result reached us (through the broker) before we look.
        assert rec.wait_for(lambda m: any(json.loads(p)["boot"] != waiting[0][0] and json.loads(p)["seq"] == made
                                          for _, p, _ in m), 30), second.log()
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
    assert [s for _, s in spooled_seqs(state / "spool-dev-t.db")] == list(range(1, 9))
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
    assert spooled_seqs(state / "spool-dev-t.db") == []


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
    assert len(lines) == 2 and "moved aside" in lines[0] and "nothing could be read back" in lines[1], d.log()


def test_a_corrupt_spool_s_readable_results_go_first_and_the_lost_are_counted(
    broker: Broker, tmp_path: Path, daemons
) -> None:
    # A spool left by an earlier run: 300 results, then two of its pages damaged as a failing card does.
    state = tmp_path / "state"
    path = state / "spool-dev-k.db"
    path.parent.mkdir()
    old = Spool(path, {"result": Quota(10**9, 10**9), "overlay": Quota(10**9, 10**9)})
    ids = [old.append("result", "edgecam/dev-k/result",
                      json.dumps({"boot": "before", "seq": i, "pad": "x" * 850}).encode(), 1) for i in range(1, 301)]
    old.close()
    leaves = leaves_of(path, [i for i in ids if i is not None])
    order = list(leaves)
    hit = [order[10], order[40]]
    lost = sorted(ids.index(i) + 1 for n in hit for i in leaves[n])  # their seqs
    damage(path, hit)

    rec = Recorder(broker.port, ["edgecam/dev-k/result", "edgecam/dev-k/stats"])
    d = daemons("--source", IMAGES, "--once", "--broker", broker.address, "--device-id", "dev-k",
                env={"EDGECAM_SPOOL_DIR": str(state)})
    assert d.wait(60) == 0, d.log()
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= 300 - len(lost) + 8, 30)
    rec.close()
    order_seen = first_seen(rec.results())
    # What could be read, in its order, then this run's eight.
    assert order_seen[: 300 - len(lost)] == [("before", s) for s in range(1, 301) if s not in lost]
    assert [s for _, s in order_seen[300 - len(lost):]] == list(range(1, 9))
    assert json.loads(rec.on("stats")[-1])["spool"]["lost_corrupt"] == len(lost)
    log = d.log()
    assert f"{300 - len(lost)} messages read back" in log and f"{len(lost)} could not be read" in log, log
    assert "Traceback" not in log


@pytest.mark.mounts
def test_full_disk_at_start_keeps_classifying_and_publishing(broker: Broker, tmp_path: Path, daemons) -> None:
    with smallfs.tmpfs(tmp_path / "full", 64 * 1024) as state:
        smallfs.fill_the_disk(state / "filler")
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


@pytest.mark.mounts
@pytest.mark.parametrize("trouble", ["full", "read_only"])
def test_a_failing_spool_disk_is_said_once_not_per_frame(
    broker: Broker, tmp_path: Path, daemons, trouble: str
) -> None:
    with smallfs.tmpfs(tmp_path / "state", 1024 * 1024) as state:
        path = state / "spool-dev-r.db"
        waiting = Spool(path, {"result": Quota(10**9, 10**9), "overlay": Quota(10**9, 10**9)})
        for i in range(1, 4):  # three results from before, waiting to be sent
            waiting.append("result", "edgecam/dev-r/result", json.dumps({"boot": "before", "seq": i}).encode(), 1)
        waiting.close()
        rec = Recorder(broker.port, "edgecam/dev-r/result")
        args = ("--source", IMAGES, "--source-fps", "20", "--broker", broker.address, "--device-id", "dev-r")
        env = {"EDGECAM_SPOOL_DIR": str(state)}
        if trouble == "read_only":
            with smallfs.read_only_file(path):
                d = daemons(*args, env=env)
                assert rec.wait_for(lambda m: len(m) >= 3 + 60, 90), d.log()
                d.proc.send_signal(signal.SIGTERM)
                assert d.wait(30) == 0, d.log()
        else:
            d = daemons(*args, env=env)
            assert rec.wait_for(lambda m: len(m) >= 3 + 3, 60), d.log()
            smallfs.fill_the_disk(state / "filler")
            n = len(rec.messages)
            # Live throughout: 60 results made and delivered on the full disk.
            assert rec.wait_for(lambda m: len(m) >= n + 60, 90), d.log()
            d.proc.send_signal(signal.SIGTERM)
            assert d.wait(30) == 0, d.log()
        rec.close()
    seen = first_seen(rec.results())
    assert seen[:3] == [("before", 1), ("before", 2), ("before", 3)]
    seqs = [s for b, s in seen[3:]]
    assert seqs == list(range(1, len(seqs) + 1))  # nothing lost or out of order meanwhile
    lines = [line for line in d.log().splitlines() if line.startswith("ERROR spool:")]
    assert len(lines) == 1, d.log()  # was one per frame
    assert "cannot write to" in lines[0] and "holding messages in memory" in lines[0]


def test_a_wall_clock_stepped_a_week_while_results_wait_loses_none(tmp_path: Path) -> None:
    # The broker is away and results wait in the spool (age limit: one hour) when NTP steps the wall
    # clock forward a week (tests/stepped_clock.py). Ages are on CLOCK_BOOTTIME: nothing expires.
    broker = Broker(tmp_path / "broker", persist=True).start()
    port = broker.port
    rec = Recorder(port, "edgecam/dev-n/result", client_id="rec-n", persistent=True)
    broker.stop()
    state = tmp_path / "state"
    conf = tmp_path / "edgecam.toml"
    conf.write_text("[spool]\nmax_age_hours = 1\n")
    offset = tmp_path / "wall-offset"
    offset.write_text("0")
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "stepped_clock.py"), str(offset), "run", "-c", str(conf),
             "--source", str(IMAGES), "--source-fps", "10", "--broker", f"127.0.0.1:{port}",
             "--device-id", "dev-n"],
            stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT,
            env={**os.environ, **FAST_RECONNECT, "EDGECAM_SPOOL_DIR": str(state)},
        )
    spool = state / "spool-dev-n.db"

    def waiting() -> int:
        try:
            return len(spooled_seqs(spool))
        except sqlite3.OperationalError:  # not created yet
            return 0

    try:
        assert wait_until(lambda: waiting() >= 20, 60, 0.1), log_path.read_text()
        offset.write_text(str(7 * 86400))  # NTP: the clock was a week behind
        stepped = waiting()
        # Results made after the step (their ts a week on) join the ones before it in the spool.
        assert wait_until(lambda: waiting() >= stepped + 20, 60, 0.1), log_path.read_text()
        broker.start()
        assert rec.wait_for(lambda m: len(m) >= stepped + 20, 60), log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        made = int(log_path.read_text().rsplit("frames, ", 1)[1].split(" results made")[0])
        assert rec.wait_for(lambda m: any(json.loads(p)["seq"] == made for _, p, _ in m), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rec.close()
        broker.stop()
    results = rec.results()
    seqs = [s for _, s in first_seen(results)]
    assert seqs == list(range(1, made + 1))  # every one, in order
    week = [r for r in results if _epoch(r["ts"]) > time.time() + 6 * 86400]
    assert week and len(week) < len(results)  # made on both sides of the step
    assert "Traceback" not in log_path.read_text()


def test_results_say_when_the_wall_clock_was_not_set(broker: Broker, daemons) -> None:
    # Whatever this machine's clock state, the results must agree with what the kernel reports
    # (adjtimex's STA_UNSYNC): a Pi before NTP says "unsynced"; a synchronised clock adds nothing.
    rec = Recorder(broker.port, "edgecam/dev-u/result")
    before = clock_synced()
    d = daemons("--source", IMAGES, "--once", "--max-frames", "3", "--broker", broker.address, "--device-id", "dev-u")
    assert d.wait(60) == 0, d.log()
    assert rec.wait_for(lambda m: len(m) >= 3, 20), d.log()
    rec.close()
    after = clock_synced()
    if before != after:
        pytest.skip(f"the kernel's clock state changed during the test ({before} -> {after})")
    for r in rec.results():
        check_result(r)
        if before is False:
            assert r["clock"] == "unsynced"
        else:
            assert "clock" not in r


def test_missing_camera_runs_degraded_without_spinning(broker: Broker, daemons) -> None:
    rec = Recorder(broker.port, ["edgecam/dev-m/status", "edgecam/dev-m/stats"])
    d = daemons("--source", "/dev/video9", "--broker", broker.address, "--device-id", "dev-m")
    assert rec.wait_for(lambda m: b"degraded" in [p for t, p, _ in m if t.endswith("/status")], 30), d.log()
    assert rec.wait_for(lambda m: any(t.endswith("/stats") for t, _, _ in m), 30)
    stats = json.loads(rec.on("stats")[-1])
    assert stats["state"] == "degraded" and "/dev/video9" in stats["reason"] and stats["status"] == "degraded"

    def tries() -> int:
        return d.log().count("opening again in")

    # Not spinning, yet live: two more attempts to open the camera within the window measured.
    before, start, start_cpu = tries(), time.monotonic(), cpu_seconds(d.proc.pid)
    assert wait_until(lambda: tries() >= before + 2, 30, 0.1), d.log()
    window = time.monotonic() - start
    assert cpu_seconds(d.proc.pid) - start_cpu < max(0.25 * window, 0.5), "the daemon spins while the camera is missing"
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert 2 <= tries() <= 8, d.log()
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
