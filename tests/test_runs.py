"""How the previous run ended, told to consumers as a counted gap: the spool's runs and reservations.

A run reserves seqs ahead of its results in a commit made durable at once; the next run reads the
newest run it finds: stopped (clean), ended under the same kernel boot (killed: the page cache kept
every commit) or under another (a power cut: the results after the newest durable one, up to the
reservation, may be lost). Real SQLite files, real Mosquitto, the daemon as a process.

A test cannot cut the power of its own machine. It takes a consistent copy of the spool while the
daemon runs (SQLite's backup API: what a disk can hold after a cut, as long as no durable commit
came after it, which the test checks), kills the daemon, puts the copy in place and starts again
under another kernel boot id (EDGECAM_BOOT_ID_FILE, for tests only).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from broker import Broker, Recorder, publish
from conftest import IMAGES, ROOT, one_error_line, wait_until
from spoolfiles import spooled_seqs

from edgecam.contract import PayloadError, check_previous, gap_text
from edgecam.device.clock import Clocks
from edgecam.device.spool import RESERVE_SEQS, PreviousRun, Quota, Spool
from edgecam.web.fleet import Fleet

FAST_RECONNECT = {"EDGECAM_MQTT_RECONNECT_MIN": "1", "EDGECAM_MQTT_RECONNECT_MAX": "2"}
QUOTAS = {"result": Quota(10**9, 10**9), "overlay": Quota(10**9, 10**9)}


def result(boot: str, seq: int) -> bytes:
    return json.dumps({"v": 1, "device": "d", "boot": boot, "seq": seq}).encode()


def spool(path: Path, kernel: str) -> Spool:
    return Spool(path, dict(QUOTAS), clocks=Clocks(boot=lambda: kernel))


def run_row(path: Path) -> tuple[int, int, int]:
    """(reserved, last_seq, clean) of the newest run, as committed."""
    db = sqlite3.connect(str(path))
    try:
        return db.execute("SELECT reserved, last_seq, clean FROM runs ORDER BY n DESC LIMIT 1").fetchone()
    finally:
        db.close()


def any_spooled(path: Path) -> bool:
    """Whether a daemon's spool holds a result yet (the file may exist before its tables)."""
    try:
        return path.exists() and bool(spooled_seqs(path))
    except sqlite3.OperationalError:
        return False


def backup(src: Path, dst: Path) -> None:
    """A consistent copy of a live database: every commit up to now, nothing after."""
    a, b = sqlite3.connect(str(src)), sqlite3.connect(str(dst))
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


# --- the spool ------------------------------------------------------------------------------------


def test_a_clean_close_then_a_kill_under_the_same_kernel_boot(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    s = spool(path, "k1")
    assert s.begin_run("aaaa") is None  # a first start: nothing before it
    for seq in range(1, 6):
        s.append("result", "t", result("aaaa", seq), 1, seq)
    s.close()
    s = spool(path, "k1")
    assert s.begin_run("bbbb") == PreviousRun("aaaa", "clean", 5, 0)
    for seq in range(1, 4):
        s.append("result", "t", result("bbbb", seq), 1, seq)
    # Not closed (SIGKILL): the page cache holds every commit, so the next run under the same boot loses none.
    s = spool(path, "k1")
    assert s.begin_run("cccc") == PreviousRun("bbbb", "killed", 3, 0)


def test_every_result_is_covered_by_a_durable_reservation_one_fsync_per_block(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    s = spool(path, "k1")
    s.begin_run("aaaa")
    reservations = set()
    for seq in range(1, 101):
        s.append("result", "t", result("aaaa", seq), 1, seq)
        reserved, last, _ = run_row(path)
        assert reserved >= seq and last <= seq  # never a result beyond what the run reserved
        reservations.add(reserved)
    # A reservation at seq 1, 34, 67, 100: one durable commit per RESERVE_SEQS results.
    assert sorted(reservations) == [1 + RESERVE_SEQS, 34 + RESERVE_SEQS, 67 + RESERVE_SEQS, 100 + RESERVE_SEQS]


def test_a_power_cut_counts_what_it_may_have_lost(tmp_path: Path) -> None:
    path, cut = tmp_path / "spool.db", tmp_path / "cut.db"
    s = spool(path, "k1")
    s.begin_run("aaaa")
    for seq in range(1, 41):
        s.append("result", "t", result("aaaa", seq), 1, seq)
        if seq == 37:
            backup(path, cut)  # what reached the disk: everything up to 37 (the reservation at 34 is durable)
    # Delivered and deleted before the cut: the disk still holds their deletes, or not; either way not lost.
    s.delete([1, 2, 3])
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    cut.rename(path)
    s2 = spool(path, "k2")
    prev = s2.begin_run("bbbb")
    assert prev == PreviousRun("aaaa", "power_cut", 37, 34 + RESERVE_SEQS - 37)
    lost = set(range(38, 41))
    assert all(prev.last_seq < n <= prev.last_seq + prev.lost_at_most for n in lost)
    # What survived is all there, to be sent.
    assert [seq for _, seq in spooled_seqs(path)] == list(range(1, 38))


def test_a_power_cut_after_every_result_was_delivered_still_bounds_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    s = spool(path, "k1")
    s.begin_run("aaaa")
    for seq in range(1, 11):
        s.delete([s.append("result", "t", result("aaaa", seq), 1, seq)])
    # The outbox is empty, but each commit recorded the run's last seq with its rows (no extra fsync):
    # killed (the page cache kept every commit), the next run knows it exactly. It said seq 1 (the
    # reservation's) before, which read as "ended after seq 1" for a run that made ten.
    copy = tmp_path / "copy.db"
    with sqlite3.connect(str(path)) as src, sqlite3.connect(str(copy)) as dst:
        src.backup(dst)
    assert spool(path, "k1").begin_run("bbbb") == PreviousRun("aaaa", "killed", 10, 0)
    # A power cut that left those commits on disk: seq 10 too, and the bound runs to the reservation (33).
    prev = spool(copy, "k2").begin_run("bbbb")
    assert prev == PreviousRun("aaaa", "power_cut", 10, 1 + RESERVE_SEQS - 10)


def test_a_run_that_made_nothing_reports_nothing_lost(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool(path, "k1").begin_run("aaaa")
    assert spool(path, "k2").begin_run("bbbb") == PreviousRun("aaaa", "power_cut", 0, 0)


def test_a_spool_from_before_runs_were_kept_opens_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL, "
               "payload BLOB NOT NULL, qos INTEGER NOT NULL, created REAL NOT NULL, stamp REAL)")
    db.execute("CREATE TABLE clock (one INTEGER PRIMARY KEY CHECK (one = 1), boot TEXT NOT NULL, "
               "offset REAL NOT NULL, last REAL NOT NULL)")
    db.executemany("INSERT INTO outbox VALUES (?, 'result', 't', ?, 1, 0, 0)",
                   [(i, result("old1", i)) for i in range(1, 6)])
    db.commit()
    db.close()
    s = spool(path, "k1")
    assert s.begin_run("aaaa") is None  # nothing recorded about the run before: no claim made
    assert s.waiting_at_start == 5
    s.append("result", "t", result("aaaa", 1), 1, 1)
    s.close()
    assert spooled_seqs(path) == [("old1", i) for i in range(1, 6)] + [("aaaa", 1)]
    assert spool(path, "k1").begin_run("bbbb") == PreviousRun("aaaa", "clean", 1, 0)


@pytest.mark.parametrize("damage", [
    "UPDATE runs SET reserved = 'abc'",          # text where a seq goes
    "UPDATE runs SET reserved = 9e999",          # a float SQLite keeps as Inf
    "UPDATE runs SET last_seq = x'00ff'",        # a blob
    "UPDATE runs SET last_seq = -5",
    "UPDATE runs SET boot = '" + "x" * 500 + "'",  # a boot id consumers refuse: every stats refused whole
    "UPDATE runs SET boot = 'a' || char(10) || 'b'",
    "UPDATE runs SET reserved = 9223372036854775807, clean = 0",  # a bound no reservation makes
    "UPDATE outbox SET payload = '{\"boot\":\"aaaa\",\"seq\":100000000000000000000}'",  # above any seq, TEXT
    "UPDATE outbox SET payload = 1000000",  # a number: it was read as bytes(1000000), a megabyte of zeros
])
def test_a_damaged_runs_row_is_one_line_and_loses_nothing(tmp_path: Path, damage: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A row no run of edgecam wrote: the daemon starts (it raised at start: int('abc'), int(inf), a seq
    SQLite cannot hold), says one line, makes no claim consumers would refuse, and keeps every message."""
    path = tmp_path / "spool.db"
    s = spool(path, "k1")
    s.begin_run("aaaa")
    s.append("result", "t", result("aaaa", 1), 1, 1)
    s.close()
    db = sqlite3.connect(str(path))
    db.execute(damage)
    db.commit()
    db.close()
    s = spool(path, "k2")
    with caplog.at_level("WARNING", logger="edgecam.device.spool"):
        previous = s.begin_run("bbbb")
    if previous is None:
        assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    else:  # what it says must be what consumers take, and bounded by the reservation
        assert check_previous(previous.to_json()) is not None
        assert previous.lost_at_most <= RESERVE_SEQS and previous.last_seq < 1 << 63
    s.append("result", "t", result("bbbb", 1), 1, 1)
    kept = s.after(0, 10)  # what the sender reads: both messages, each no bigger than what is stored
    s.close()
    assert len(kept) == 2 and kept[1].payload == result("bbbb", 1) and len(kept[0].payload) < 100
    after = spool(path, "k2").begin_run("cccc")
    assert after is not None and (after.boot, after.end, after.last_seq) == ("bbbb", "clean", 1)


def test_an_end_never_told_is_carried_to_the_next_run_that_can(tmp_path: Path) -> None:
    """The broker away through a power cut and a crash after it: the run that reported the cut never got a
    stats message acknowledged, so the run after it tells both; once told, no run repeats it."""
    path = tmp_path / "spool.db"
    a = spool(path, "k1")
    a.begin_run("aaaa")
    for seq in range(1, 4):
        a.append("result", "t", result("aaaa", seq), 1, seq)
    cut = PreviousRun("aaaa", "power_cut", 3, RESERVE_SEQS - 2)  # reserved at seq 1: 1 + 32
    b = spool(path, "k2")
    assert b.begin_run("bbbb") == cut
    b.append("result", "t", result("bbbb", 1), 1, 1)  # then killed, its stats never acknowledged
    c = spool(path, "k2")
    prev = c.begin_run("cccc")
    assert prev == PreviousRun("bbbb", "killed", 1, 0, (cut,))
    assert gap_text(prev.to_json()) == (
        "previous run bbbb ended without a stop after seq 1; nothing lost. Earlier, run aaaa ended by a power "
        f"cut: up to {RESERVE_SEQS - 2} results lost after seq 3 (not told before)")
    c.told()  # the broker acknowledged c's stats: both ends have reached consumers
    d = spool(path, "k2")
    assert d.begin_run("dddd") == PreviousRun("cccc", "killed", 0, 0)
    # A clean run that never told (d: no stats acknowledged) does not hide the untold end before it.
    d.close()
    prev = spool(path, "k3").begin_run("eeee")
    assert prev == PreviousRun("dddd", "clean", 0, 0, (PreviousRun("cccc", "killed", 0, 0),))
    assert gap_text(prev.to_json()) == "Earlier, run cccc ended without a stop after its start; nothing lost " \
        "(not told before)"


def test_runs_kept_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    for i in range(40):
        s = spool(path, "k1")
        s.begin_run(f"b{i:03d}")
        s.close()
    db = sqlite3.connect(str(path))
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] <= 16
    db.close()


# --- the contract's reading of it -----------------------------------------------------------------


def test_previous_checked_and_told() -> None:
    assert check_previous(None) is None
    for bad, why in ((["x"], "not an object"), ({"boot": "a", "end": "lunch", "last_seq": 1, "lost_at_most": 0},
                                                  "previous.end"),
                     ({"boot": "a", "end": "clean", "last_seq": -1, "lost_at_most": 0}, "previous.last_seq"),
                     ({"boot": "a", "end": "clean", "last_seq": 1, "lost_at_most": True}, "previous.lost_at_most"),
                     ({"end": "clean", "last_seq": 1, "lost_at_most": 0}, "previous.boot"),
                     ({"boot": "a", "end": "clean", "last_seq": 1, "lost_at_most": 0, "earlier": {}},
                      "previous.earlier"),
                     ({"boot": "a", "end": "clean", "last_seq": 1, "lost_at_most": 0, "earlier": [{"boot": "b"}]},
                      r"previous.earlier\[\].end"),
                     ({"boot": "a", "end": "clean", "last_seq": 1, "lost_at_most": 0, "earlier": [
                         {"boot": "b", "end": "clean", "last_seq": 1, "lost_at_most": 0, "earlier": []}]},
                      "nests")):
        with pytest.raises(PayloadError, match=why):
            check_previous(bad)
    assert gap_text(PreviousRun("ab12", "clean", 9, 0).to_json()) is None
    assert gap_text(PreviousRun("ab12", "killed", 9, 0).to_json()) == (
        "previous run ab12 ended without a stop after seq 9; nothing lost")
    assert gap_text(PreviousRun("ab12", "power_cut", 22, 3).to_json()) == (
        "previous run ab12 ended by a power cut: up to 3 results lost after seq 22")
    assert gap_text(PreviousRun("ab12", "power_cut", 0, 0).to_json()) == (
        "previous run ab12 ended by a power cut: nothing lost")


def test_the_fleet_shows_the_gap_and_rejects_a_bad_one() -> None:
    fleet = Fleet()
    stats = {"v": 1, "device": "cam-1", "boot": "cd34", "fps": 1.0,
             "previous": PreviousRun("ab12", "power_cut", 22, 3).to_json()}
    assert fleet.ingest("edgecam/cam-1/stats", json.dumps(stats).encode(), 1.0) == "cam-1"
    shown = fleet.snapshot(2.0, 60.0)["devices"][0]
    assert shown["gap"] == "previous run ab12 ended by a power cut: up to 3 results lost after seq 22"
    # A bad `previous` is counted and dropped; the rest of the stats (fps, state) still shows.
    stats["previous"], stats["fps"] = {"boot": "ab12", "end": "power_cut", "last_seq": "many"}, 2.5
    assert fleet.ingest("edgecam/cam-1/stats", json.dumps(stats).encode(), 3.0) == "cam-1"
    assert "previous.last_seq" in fleet.last_bad and fleet.bad == 1
    shown = fleet.snapshot(4.0, 60.0)["devices"][0]
    assert shown["gap"] is None and shown["fps"] == 2.5


def test_watch_tells_the_gap_once(broker: Broker) -> None:
    stats = json.dumps({"v": 1, "device": "cam-1", "boot": "cd34",
                        "previous": PreviousRun("ab12", "power_cut", 22, 3).to_json()})
    publish(broker.port, "edgecam/cam-1/stats", stats, retain=True)
    proc = subprocess.Popen([sys.executable, "-m", "edgecam", "watch", "--broker", broker.address, "--count", "1",
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stderr is not None and "watching" in proc.stderr.readline()
        publish(broker.port, "edgecam/cam-1/stats", stats)  # the next stats say it again: told once
        publish(broker.port, "edgecam/cam-1/result", json.dumps(
            {"v": 1, "device": "cam-1", "boot": "cd34", "seq": 1, "top": [{"label": "a", "score": 0.5}],
             "cam": {}}))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "cam-1: previous run ab12 ended by a power cut: up to 3 results lost after seq 22", out
    assert sum("power cut" in line for line in lines) == 1 and lines[1].startswith("cam-1 #1"), out


# --- the daemon, with a real broker ---------------------------------------------------------------


def stats_with_previous(rec: Recorder, boot: str) -> list[dict[str, Any]]:
    return [s for s in map(json.loads, rec.on("stats")) if (s.get("previous") or {}).get("boot") == boot]


def boots_seqs(rec: Recorder, boot: str) -> set[int]:
    return {r["seq"] for r in rec.results() if r["boot"] == boot}


@pytest.mark.usefixtures("model_cache")
def test_killed_then_stopped_cleanly_as_the_next_runs_say(tmp_path: Path, daemons) -> None:
    broker = Broker(tmp_path / "broker", persist=True).start()
    dev = "dev-k"
    rec = Recorder(broker.port, [f"edgecam/{dev}/result", f"edgecam/{dev}/stats"], client_id="rec-k", persistent=True)
    args = ("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", dev)
    try:
        first = daemons(*args, env=FAST_RECONNECT)
        assert rec.wait_for(lambda m: len([t for t, _, _ in m if t.endswith("/result")]) >= 5, 60), first.log()
        boot1 = rec.results()[0]["boot"]
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait()
        second = daemons(*args, env=FAST_RECONNECT)
        assert rec.wait_for(lambda _m: stats_with_previous(rec, boot1), 60), second.log()
        prev = stats_with_previous(rec, boot1)[0]["previous"]
        assert prev["end"] == "killed" and prev["lost_at_most"] == 0, prev
        assert "ended without a stop" in second.log() and "nothing lost" in second.log()
        # Every result the killed run made is delivered: none missing up to the last the spool knew of.
        assert rec.wait_for(lambda _m: boots_seqs(rec, boot1) >= set(range(1, prev["last_seq"] + 1)), 60)
        got = boots_seqs(rec, boot1)
        assert got == set(range(1, max(got) + 1)), sorted(got)
        assert max(got) == prev["last_seq"], (sorted(got), prev)  # every commit recorded the last seq
        boot2 = stats_with_previous(rec, boot1)[0]["boot"]
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.log()
        made = int(second.log().rsplit("frames, ", 1)[1].split(" results made")[0])
        third = daemons(*args, "--max-frames", "2", env=FAST_RECONNECT)
        assert third.wait(60) == 0, third.log()
        assert rec.wait_for(lambda _m: stats_with_previous(rec, boot2), 30), third.log()
        assert stats_with_previous(rec, boot2)[-1]["previous"] == {
            "boot": boot2, "end": "clean", "last_seq": made, "lost_at_most": 0}
        assert "previous run" not in third.log()  # a clean stop is no news: no warning
    finally:
        rec.close()
        broker.stop()
    for d in (first, second, third):
        assert "Traceback" not in d.log()


@pytest.mark.usefixtures("model_cache")
def test_a_second_daemon_on_the_same_spool_is_refused(tmp_path: Path, daemons) -> None:
    """A hand-run `edgecam run` beside the service picks the same spool (state directory and device id):
    the two sent and deleted each other's rows, fought over the client id, and the second read the
    first's live run as killed. Now the second is refused with one line naming the first."""
    broker = Broker(tmp_path / "broker").start()
    rec = Recorder(broker.port, "edgecam/dev-l/result")
    args = ("--source", IMAGES, "--source-fps", "2", "--broker", broker.address, "--device-id", "dev-l")
    try:
        first = daemons(*args)
        assert rec.wait_for(lambda m: len(m) >= 1, 60), first.log()
        second = daemons(*args)
        assert second.wait(60) == 2, second.log()
        held = f"another edgecam run (PID {first.proc.pid}) is using this spool"
        one_error_line(SimpleNamespace(stderr=second.log()), held)
        assert first.proc.poll() is None and "previous run" not in second.log()
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, first.log()
        # Its end lets the lock go: the next one runs.
        third = daemons(*args, "--max-frames", "1")
        assert third.wait(60) == 0, third.log()
    finally:
        rec.close()
        broker.stop()


@pytest.mark.usefixtures("model_cache")
def test_a_power_cut_is_a_counted_gap_that_covers_what_was_lost(tmp_path: Path, daemons) -> None:
    state, dev = tmp_path / "state", "dev-p"
    path, cut = state / f"spool-{dev}.db", tmp_path / "cut.db"
    kernel = tmp_path / "boot_id"
    kernel.write_text("11111111-1111-1111-1111-111111111111\n")
    env = {**FAST_RECONNECT, "EDGECAM_SPOOL_DIR": str(state), "EDGECAM_BOOT_ID_FILE": str(kernel)}
    broker = Broker(tmp_path / "broker", persist=True).start()
    rec = Recorder(broker.port, [f"edgecam/{dev}/result", f"edgecam/{dev}/stats"], client_id="rec-p", persistent=True)
    broker.stop()  # away: the results stay in the spool, as in the lab's power cut
    args = ("--source", IMAGES, "--source-fps", "5", "--broker", broker.address, "--device-id", dev)
    try:
        first = daemons(*args, env=env)
        # Right after the run's first reservation (made with its first result), the cut's copy of the disk.
        assert wait_until(lambda: any_spooled(path), 90, 0.05), first.log()
        backup(path, cut)
        cut_reserved, _, _ = run_row(cut)
        cut_seqs = spooled_seqs(cut)
        boot1, cut_last = cut_seqs[-1]
        assert cut_last < cut_reserved
        # More results after the copy, fewer than would need a new durable reservation: those the cut loses.
        assert wait_until(lambda: spooled_seqs(path)[-1][1] >= cut_last + 3, 60, 0.05), first.log()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.wait()
        made = spooled_seqs(path)[-1][1]
        live_reserved, _, _ = run_row(path)
        # A valid stand-in for a cut: no commit made durable (a reservation) came after the copy.
        assert live_reserved == cut_reserved and made <= cut_reserved, (live_reserved, cut_reserved, made)
        lost = set(range(cut_last + 1, made + 1))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        cut.rename(path)
        kernel.write_text("22222222-2222-2222-2222-222222222222\n")  # the reboot
        broker.start()
        second = daemons(*args, env=env)
        assert rec.wait_for(lambda _m: stats_with_previous(rec, boot1), 60), second.log()
        prev = stats_with_previous(rec, boot1)[0]["previous"]
        assert prev == {"boot": boot1, "end": "power_cut", "last_seq": cut_last,
                        "lost_at_most": cut_reserved - cut_last}, prev
        # The results really lost lie within the counted gap.
        assert lost and all(prev["last_seq"] < n <= prev["last_seq"] + prev["lost_at_most"] for n in lost)
        # Everything that survived the cut arrives.
        assert rec.wait_for(lambda _m: boots_seqs(rec, boot1) >= set(range(1, cut_last + 1)), 60), second.log()
        assert not boots_seqs(rec, boot1) & lost
        warning = f"previous run {boot1} ended by a power cut: up to {cut_reserved - cut_last} results lost " \
                  f"after seq {cut_last}"
        assert f"WARNING spool: {warning}" in second.log(), second.log()
    finally:
        rec.close()
        broker.stop()
    assert "Traceback" not in first.log() + second.log()
