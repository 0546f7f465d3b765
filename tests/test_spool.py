"""The durable outbox (edgecam.device.spool): order, persistence, quotas, and what happens when the file fails.

Every test uses a real SQLite file under tmp_path; the disk-full tests mount small tmpfs
filesystems (see tests/smallfs.py for how, and why they may not run). No test sleeps: ages
come from clocks the test moves (Times), and the flush back-off runs on a fake monotonic clock.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import smallfs
from conftest import ROOT
from smallfs import fill_the_disk, free_bytes
from spoolfiles import btree_pages, damage, leaves_of

import edgecam.device.spool as spool_mod
from edgecam.device.clock import Clocks
from edgecam.device.spool import Message, Quota, Spool

BIG = 10**12  # a quota that never bites
KINDS = ("result", "overlay")


def quotas(
    result_bytes: int = BIG,
    result_age: float = BIG,
    policy: str = "drop_oldest",
    overlay_bytes: int = BIG,
    overlay_age: float = BIG,
) -> dict[str, Quota]:
    return {
        "result": Quota(result_bytes, result_age, policy),
        "overlay": Quota(overlay_bytes, overlay_age, policy),
    }


class Times:
    """The spool's clocks as a test moves them: the wall clock, the uptime, the boot id."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.up = 1000.0
        self.boot = "boot-1"

    def clocks(self) -> Clocks:
        return Clocks(wall=lambda: self.wall, uptime=lambda: self.up, boot=lambda: self.boot)

    def pass_(self, seconds: float) -> None:
        """Time passes, on both clocks."""
        self.wall += seconds
        self.up += seconds


@pytest.fixture
def times() -> Times:
    return Times()


@pytest.fixture
def spools() -> Iterator[Callable[..., Spool]]:
    """Open spools with `spools(path, quotas, memory_limit, clocks)`; all are closed after the test."""
    opened: list[Spool] = []

    def make(
        path: Path | None, q: dict[str, Quota] | None = None, memory_limit: int = 1000, clocks: Clocks | None = None
    ) -> Spool:
        s = Spool(path, q or quotas(), memory_limit, clocks)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def payload(i: int, size: int = 100) -> bytes:
    """`size` bytes that name message i, so a mix-up of payloads shows."""
    head = f"msg-{i:05d}:".encode()
    return (head * (size // len(head) + 1))[:size]


def all_ids(s: Spool) -> list[int]:
    return [m.id for m in s.after(0, 10**6)]


# --- order, fields, delete, counts ----------------------------------------------------------------


def test_messages_come_back_in_order_with_their_fields(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    s = spools(tmp_path / "spool.db", clocks=times.clocks())
    assert s.state == "file"
    assert s.reason == ""
    now = times.wall
    sent = [
        ("result", "edgecam/dev/result", b'{"seq":1}', 1, now - 3.5),
        ("overlay", "edgecam/dev/overlay", b"\xff\xd8\x00jpeg\x00\xff\xd9", 0, now - 2.25),
        ("result", "edgecam/dev/result", b'{"seq":2}', 0, now - 1.0),
        ("result", "other/topic", b"", 1, now),
    ]
    ids = []
    for kind, topic, data, qos, created in sent:
        times.wall = created  # `created` is the wall clock's say
        ids.append(s.append(kind, topic, data, qos))
    assert all(isinstance(i, int) for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids)), ids

    got = s.after(0, 100)
    assert got == [Message(i, *fields) for i, fields in zip(ids, sent, strict=True)]
    assert all(type(m.payload) is bytes for m in got)

    # The cursor and the limit.
    assert [m.id for m in s.after(ids[0], 2)] == ids[1:3]
    assert [m.id for m in s.after(ids[1], 100)] == ids[2:]
    assert s.after(ids[-1], 100) == []
    assert s.after(ids[-1] + 1000, 100) == []
    assert s.after(0, 0) == []


def test_created_defaults_to_now(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db")
    before = time.time()
    s.append("result", "t", b"x", 1)
    after = time.time()
    (m,) = s.after(0, 10)
    assert before <= m.created <= after


def test_delete_and_counts(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db")
    assert s.counts() == {
        "waiting": 0, "bytes": 0, "in_memory": 0, "dropped_results": 0, "dropped_overlays": 0, "lost_corrupt": 0
    }
    ids = [s.append("result", "t", payload(i, 100 + i), 1) for i in range(6)]
    ov = s.append("overlay", "o", payload(99, 1000), 1)
    assert s.counts() == {
        "waiting": 7,
        "bytes": sum(100 + i for i in range(6)) + 1000,
        "in_memory": 0,
        "dropped_results": 0,
        "dropped_overlays": 0,
        "lost_corrupt": 0,
    }

    s.delete([ids[1], ids[3], ov])
    assert all_ids(s) == [ids[0], ids[2], ids[4], ids[5]]
    c = s.counts()
    assert c["waiting"] == 4
    assert c["bytes"] == 100 + 102 + 104 + 105

    s.delete([])  # nothing to do
    s.delete([ids[1], 10**9])  # already gone, and never there: no error, counts unchanged
    assert s.counts()["waiting"] == 4
    assert s.counts()["bytes"] == 100 + 102 + 104 + 105

    s.delete([ids[0], ids[2], ids[4], ids[5]])
    assert s.after(0, 100) == []
    assert s.counts()["waiting"] == 0
    assert s.counts()["bytes"] == 0
    # Deleting is acknowledging, not dropping.
    assert s.dropped == {"result": 0, "overlay": 0}


def test_ids_keep_growing_after_deletes(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db")
    first = [s.append("result", "t", payload(i), 1) for i in range(3)]
    s.delete(first)
    later = s.append("result", "t", payload(3), 1)
    assert later is not None
    assert later > max(i for i in first if i is not None)


# --- persistence ----------------------------------------------------------------------------------


def test_messages_survive_close_and_reopen(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    path = tmp_path / "spool.db"
    s = spools(path)
    ids = [s.append("result", f"t/{i}", payload(i), i % 2) for i in range(5)]
    before = s.after(0, 100)
    s.close()

    s2 = spools(path)
    assert s2.state == "file"
    assert s2.after(0, 100) == before
    assert [m.id for m in before] == ids
    assert s2.counts()["waiting"] == 5
    assert s2.counts()["bytes"] == 500

    new = s2.append("result", "t/new", payload(5), 1)
    assert new is not None
    assert new > max(i for i in ids if i is not None)
    assert all_ids(s2) == [*ids, new]


def test_new_ids_follow_the_rows_still_present_after_reopen(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    path = tmp_path / "spool.db"
    s = spools(path)
    ids = [s.append("result", "t", payload(i), 1) for i in range(5)]
    s.delete(ids[3:])  # the two newest were acknowledged
    s.close()

    s2 = spools(path)
    assert all_ids(s2) == ids[:3]
    new = [s2.append("result", "t", payload(10 + i), 1) for i in range(2)]
    # Ids continue above the highest row still present, so new messages leave after the old ones.
    assert all(n is not None and n > ids[2] for n in new)
    got = s2.after(0, 100)
    assert [m.id for m in got] == [*ids[:3], *new]
    assert [m.payload for m in got] == [payload(0), payload(1), payload(2), payload(10), payload(11)]


def test_quotas_hold_across_reopen(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    path = tmp_path / "spool.db"
    s = spools(path)
    ids = [s.append("result", "t", payload(i), 1) for i in range(8)]
    s.close()

    # Reopened with room for five: the bytes already on disk count against it.
    s2 = spools(path, quotas(result_bytes=500))
    assert s2.counts()["bytes"] == 800
    new = s2.append("result", "t", payload(8), 1)
    assert all_ids(s2) == [*ids[4:], new]
    assert s2.dropped["result"] == 4
    assert s2.counts()["bytes"] == 500


def test_messages_survive_the_process_being_killed(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    path = tmp_path / "spool.db"
    code = f"""
import os
import sqlite3
from pathlib import Path
from edgecam.device.clock import Clocks
from edgecam.device.spool import Quota, Spool
q = {{"result": Quota(10**12, 10**12), "overlay": Quota(10**12, 10**12)}}
wall = [1000.0]
s = Spool(Path({str(path)!r}), q, clocks=Clocks(wall=lambda: wall[0]))
assert s.state == "file", s.reason
ids = []
for i in range(20):
    wall[0] = 1000.0 + i
    ids.append(s.append("result", "t/%d" % i, b"payload-%d" % i, 1))
wall[0] = 2000.0
ids.append(s.append("overlay", "o", b"jpeg", 0))
print(",".join(map(str, ids)), flush=True)
os._exit(0)  # no close(): no checkpoint, the WAL is all there is
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ids = [int(x) for x in proc.stdout.strip().split(",")]
    assert len(ids) == 21
    assert Path(str(path) + "-wal").exists()  # the process really died without checkpointing

    s = spools(path)
    got = s.after(0, 100)
    assert [m.id for m in got] == ids
    assert [m.payload for m in got] == [b"payload-%d" % i for i in range(20)] + [b"jpeg"]
    assert got[3] == Message(ids[3], "result", "t/3", b"payload-3", 1, 1003.0)
    assert got[-1] == Message(ids[-1], "overlay", "o", b"jpeg", 0, 2000.0)
    assert s.counts()["waiting"] == 21


# --- size quota -----------------------------------------------------------------------------------


def test_size_quota_drop_oldest(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000, policy="drop_oldest"))
    ids = [s.append("result", "t", payload(i), 1) for i in range(15)]
    assert all(i is not None for i in ids)  # drop_oldest always takes the new one
    got = s.after(0, 100)
    assert [m.id for m in got] == ids[5:]
    assert [m.payload for m in got] == [payload(i) for i in range(5, 15)]
    assert s.dropped["result"] == 5
    c = s.counts()
    assert c["dropped_results"] == 5
    assert c["dropped_overlays"] == 0
    assert c["waiting"] == 10
    assert c["bytes"] == 1000


def test_size_quota_drop_oldest_makes_room_for_a_big_one(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000))
    ids = [s.append("result", "t", payload(i), 1) for i in range(10)]
    big = s.append("result", "t", payload(99, 350), 1)  # needs four 100-byte messages to leave
    assert all_ids(s) == [*ids[4:], big]
    assert s.dropped["result"] == 4
    assert s.counts()["bytes"] == 950


def test_size_quota_drop_newest(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000, policy="drop_newest"))
    results = [s.append("result", "t", payload(i), 1) for i in range(15)]
    kept = results[:10]
    assert all(i is not None for i in kept)
    assert results[10:] == [None] * 5
    got = s.after(0, 100)
    assert [m.id for m in got] == kept
    assert [m.payload for m in got] == [payload(i) for i in range(10)]
    assert s.dropped["result"] == 5
    assert s.counts()["dropped_results"] == 5
    assert s.counts()["bytes"] == 1000

    # Once the sender has delivered some, new ones are taken again, after the old ones.
    s.delete(kept[:2])
    new = [s.append("result", "t", payload(20 + i), 1) for i in range(3)]
    assert new[:2] != [None, None]
    assert new[2] is None
    assert all_ids(s) == [*kept[2:], *new[:2]]
    assert s.dropped["result"] == 6


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_payload_bigger_than_the_quota_is_refused(
    tmp_path: Path, spools: Callable[..., Spool], policy: str
) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000, policy=policy))
    a = s.append("result", "t", payload(0), 1)
    assert s.append("result", "t", payload(1, 1001), 1) is None
    exact = s.append("result", "t", payload(2, 1000), 1)  # exactly the quota: fits once the rest is gone
    assert s.dropped["result"] == 2  # the too-big one, then `a` (drop_oldest) or `exact` (drop_newest)
    if policy == "drop_oldest":
        assert all_ids(s) == [exact]
    else:
        assert exact is None
        assert all_ids(s) == [a]
    assert s.counts()["dropped_results"] == s.dropped["result"]


# --- age quota ------------------------------------------------------------------------------------


def test_age_quota(tmp_path: Path, spools: Callable[..., Spool], times: Times) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=60), clocks=times.clocks())
    start = times.wall
    old = s.append("result", "t", payload(0), 1)
    times.pass_(90)
    recent = s.append("result", "t", payload(1), 1)
    times.pass_(30)
    new = s.append("result", "t", payload(2), 1)
    assert None not in (old, recent, new)
    got = s.after(0, 100)
    assert [m.id for m in got] == [recent, new]
    assert [m.created for m in got] == [start + 90, start + 120]
    assert s.dropped["result"] == 1
    c = s.counts()
    assert c["dropped_results"] == 1
    assert c["waiting"] == 2
    assert c["bytes"] == 200


def test_age_quota_drops_every_expired_message(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=60, overlay_age=60), clocks=times.clocks())
    for i in range(5):
        s.append("result", "t", payload(i), 1)
        times.pass_(1)
    times.pass_(5)
    keep = s.append("result", "t", payload(5), 1)
    times.pass_(10)
    ov = s.append("overlay", "o", payload(50), 1)
    # An append expires its own kind: the first five are over 60 s old 65 s after the first.
    times.pass_(45)
    new = s.append("result", "t", payload(6), 1)
    assert s.dropped == {"result": 5, "overlay": 0}
    assert all_ids(s) == [keep, ov, new]


def test_a_kind_that_stopped_coming_expires_when_read(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=BIG, overlay_age=60), clocks=times.clocks())
    stale = s.append("overlay", "o", payload(0), 1)
    times.pass_(120)
    # Results keep coming, overlays stopped: the stale overlay must not be sent all the same.
    results = [s.append("result", "t", payload(10 + i), 1) for i in range(3)]
    assert stale is not None and s.counts()["waiting"] == 4
    assert all_ids(s) == results
    assert s.dropped == {"result": 0, "overlay": 1}
    assert s.counts()["waiting"] == 3


# --- kinds ----------------------------------------------------------------------------------------


def test_kinds_have_separate_quotas(tmp_path: Path, spools: Callable[..., Spool], times: Times) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000, overlay_bytes=2000, overlay_age=60),
               clocks=times.clocks())
    results = [s.append("result", "r", payload(i), 1) for i in range(10)]  # the result quota exactly
    overlays = []
    for i in range(20):
        overlays.append(s.append("overlay", "o", payload(100 + i, 500), 0))
        times.pass_(1)
    assert None not in overlays
    # And age the overlays out too.
    times.pass_(1000)
    late = s.append("overlay", "o", payload(200, 500), 0)

    got = s.after(0, 100)
    assert [m.id for m in got if m.kind == "result"] == results
    assert [m.id for m in got if m.kind == "overlay"] == [late]
    assert s.dropped == {"result": 0, "overlay": 20}
    c = s.counts()
    assert c["dropped_results"] == 0
    assert c["dropped_overlays"] == 20
    assert c["bytes"] == 1000 + 500

    # And the other way round: filling results drops results, never overlays.
    more = [s.append("result", "r", payload(300 + i), 1) for i in range(3)]
    got = s.after(0, 100)
    assert [m.id for m in got] == [*results[3:], late, *more]
    assert s.dropped == {"result": 3, "overlay": 20}


# --- a corrupt or unusable file -------------------------------------------------------------------


def test_corrupt_file_is_moved_aside(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state" / "spool.db"
    path.parent.mkdir()
    garbage = (b"not a database " * 300)[:4096]
    path.write_bytes(garbage)

    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert s.state == "file", s.reason
    assert s.reason == ""

    aside = [p for p in path.parent.iterdir() if p.name.startswith("spool.db.corrupt-")]
    assert len(aside) == 1, sorted(p.name for p in path.parent.iterdir())
    assert aside[0].read_bytes() == garbage
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"  # a new spool in its place

    errors = [r for r in caplog.records if r.name.startswith("edgecam") and r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    text = errors[0].getMessage()
    assert str(path) in text
    assert "corrupt" in text
    assert aside[0].name in text

    # And the new one works, and lasts.
    ids = [s.append("result", "t", payload(i), 1) for i in range(3)]
    s.close()
    s2 = spools(path)
    assert all_ids(s2) == ids
    assert len([p for p in path.parent.iterdir() if ".corrupt-" in p.name]) == 1  # no second move


def test_unusable_location_falls_back_to_memory(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a regular file")
    path = blocker / "spool.db"

    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path, quotas(), memory_limit=5)
    assert s.state == "memory"
    assert str(path) in s.reason
    assert any(r.levelno == logging.ERROR and str(path) in r.getMessage() for r in caplog.records)
    assert blocker.read_bytes() == b"a regular file"  # left alone

    ids = [s.append("result", "t", payload(i), 1) for i in range(3)]
    assert None not in ids
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert [m.payload for m in s.after(0, 100)] == [payload(i) for i in range(3)]
    assert [m.id for m in s.after(ids[0], 100)] == ids[1:]
    assert [m.id for m in s.after(0, 2)] == ids[:2]
    c = s.counts()
    assert (c["waiting"], c["bytes"], c["in_memory"]) == (3, 300, 3)

    s.delete([ids[1]])
    assert all_ids(s) == [ids[0], ids[2]]
    c = s.counts()
    assert (c["waiting"], c["bytes"], c["in_memory"]) == (2, 200, 2)

    # memory_limit bounds it: the oldest go, and are counted.
    more = [s.append("result", "t", payload(10 + i), 1) for i in range(6)]
    assert None not in more
    assert all_ids(s) == more[1:]
    assert s.dropped["result"] == 3
    c = s.counts()
    assert (c["waiting"], c["bytes"], c["in_memory"], c["dropped_results"]) == (5, 500, 5, 3)
    assert s.state == "memory"


def test_memory_only_quota_still_applies(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(None, quotas(result_bytes=300), memory_limit=100)
    assert s.state == "memory"
    ids = [s.append("result", "t", payload(i), 1) for i in range(5)]
    assert all_ids(s) == ids[2:]
    assert s.dropped["result"] == 2


# --- salvaging a corrupt file ---------------------------------------------------------------------
#
# Real spool files with known rows, damaged page by page as a failing SD card damages them. Which
# rows sat on which page is read from the file's bytes (tests/spoolfiles.py), not from SQLite.


def written_and_closed(path: Path, n: int, size: int, kind: str = "result") -> list[int]:
    s = Spool(path, quotas())
    ids = [s.append(kind, "t", payload(i, size), 1) for i in range(n)]
    s.close()
    assert None not in ids
    return [i for i in ids if i is not None]


def spool_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("edgecam") and r.getMessage().startswith("spool:")]


@pytest.mark.parametrize("how", ["zeroed", "random"])
def test_what_sqlite_can_still_read_from_a_corrupt_file_is_sent_and_the_rest_counted(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture, how: str
) -> None:
    path = tmp_path / "spool.db"
    ids = written_and_closed(path, 400, 900)
    leaves = leaves_of(path, ids)
    order = list(leaves)
    # Three leaves inside the table, two of them neighbours: stretches of one page and of two.
    hit = [order[5], order[len(order) // 2], order[len(order) // 2 + 1]]
    lost = sorted(i for n in hit for i in leaves[n])
    damage(path, hit, how)
    damaged = path.read_bytes()

    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert s.state == "file", s.reason
    kept = [i for i in ids if i not in lost]
    got = s.after(0, 10**6)
    assert [m.id for m in got] == kept
    assert [m.payload for m in got] == [payload(ids.index(i), 900) for i in kept]
    c = s.counts()
    assert (c["waiting"], c["bytes"], c["lost_corrupt"]) == (len(kept), 900 * len(kept), len(lost))

    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("spool.db.corrupt-")]  # nothing beside it
    assert aside.read_bytes() == damaged  # evidence kept as it was
    lines = spool_lines(caplog)
    assert [lvl for lvl, _ in lines] == [logging.ERROR, logging.WARNING], lines
    assert "corrupt" in lines[0][1] and aside.name in lines[0][1]
    assert f"{len(kept)} messages read back from {aside.name}" in lines[1][1]
    assert f"{len(lost)} could not be read and are lost" in lines[1][1]
    assert "cannot tell" not in lines[1][1]  # an exact count

    # New messages go after the salvaged ones, and all of it is in the new file.
    new = s.append("result", "t", payload(999), 1)
    s.close()
    s2 = spools(path)
    assert all_ids(s2) == [*kept, new]
    assert s2.counts()["lost_corrupt"] == 0


def test_salvaged_messages_keep_the_age_they_had(tmp_path: Path, spools: Callable[..., Spool], times: Times) -> None:
    path = tmp_path / "spool.db"
    s = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    ids = []
    for i in range(200):
        ids.append(s.append("result", "t", payload(i, 900), 1))
        times.pass_(1)
    s.close()
    leaves = leaves_of(path, [i for i in ids if i is not None])
    damage(path, [list(leaves)[len(leaves) // 2]])
    times.pass_(100)  # the restart that finds the damage, in the same boot
    s2 = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    assert s2.counts()["lost_corrupt"] > 0 and all_ids(s2)[0] == ids[0]
    # The first one has waited 300 s: it expires after 3300 s more, not an hour from the salvage.
    times.pass_(HOUR - 300)
    assert all_ids(s2)[0] == ids[0]
    times.pass_(1)
    assert all_ids(s2)[0] == ids[1]


def test_a_damaged_interior_page_hides_a_stretch_that_is_counted(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    ids = written_and_closed(path, 3000, 1500)  # two to a leaf: four or more interior pages
    pages = btree_pages(path)
    leaves = leaves_of(path, ids)
    children = pages[2][1]  # page 2 is the root
    assert len(children) >= 3 and all(pages[c][0] == 0x05 for c in children), "the table should have three levels"
    hit = children[len(children) // 2]
    under = sorted(i for child in pages[hit][1] for i in leaves.get(child, []))
    assert under and under[0] > ids[0] and under[-1] < ids[-1]  # a stretch inside the table
    damage(path, [hit])
    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert all_ids(s) == [i for i in ids if i not in set(under)]
    assert s.counts()["lost_corrupt"] == len(under)


def test_damage_at_the_start_of_the_table_is_said_to_be_uncounted(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    ids = written_and_closed(path, 200, 900)
    leaves = leaves_of(path, ids)
    first = next(iter(leaves))
    damage(path, [first])
    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert all_ids(s) == [i for i in ids if i not in leaves[first]]
    # SQLite cannot tell the lowest id any more, so how many the first page held is unknown: the
    # log says so rather than guess.
    assert s.counts()["lost_corrupt"] == 0
    assert "cannot tell" in spool_lines(caplog)[1][1]


def test_a_broken_overflow_page_loses_only_its_own_message(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    ids = written_and_closed(path, 10, 64 * 1024, kind="overlay")  # each spills over 16 overflow pages
    data = path.read_bytes()
    mark = payload(4, 64)[:10]  # "msg-00004:"
    page = next(n for n in range(3, len(data) // 4096 + 1)
                if data[(n - 1) * 4096] == 0 and mark in data[(n - 1) * 4096 + 4 : (n - 1) * 4096 + 40])
    damage(path, [page])
    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert all_ids(s) == ids[:4] + ids[5:]
    assert s.counts()["lost_corrupt"] == 1
    assert [m.payload for m in s.after(0, 100)] == [payload(i, 64 * 1024) for i in (0, 1, 2, 3, 5, 6, 7, 8, 9)]


def test_not_a_database_at_all_salvages_nothing_and_says_so(
    tmp_path: Path, spools: Callable[..., Spool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database " * 300)
    with caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
    assert s.state == "file" and all_ids(s) == [] and s.counts()["lost_corrupt"] == 0
    assert "nothing could be read back" in spool_lines(caplog)[1][1]


# --- ages on a clock that does not jump -------------------------------------------------------------
#
# A Pi without an RTC boots on fake-hwclock's saved time, then NTP steps the wall clock. The spool
# measures ages on CLOCK_BOOTTIME, carried across restarts and boots through the file.

HOUR, DAY = 3600.0, 86400.0


def test_a_wall_clock_stepped_forward_a_week_expires_nothing(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    path = tmp_path / "spool.db"
    s = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    ids = []
    for i in range(50):  # the broker is away; results wait
        ids.append(s.append("result", "t", payload(i), 1))
        times.pass_(1)
    times.wall += 7 * DAY  # NTP steps the clock fake-hwclock booted on
    times.pass_(5)
    more = [s.append("result", "t", payload(100 + i), 1) for i in range(5)]  # appends expire their kind
    assert all_ids(s) == [*ids, *more]  # and so do reads
    assert s.dropped == {"result": 0, "overlay": 0}
    s.close()
    # The ages are in the file: reopened in the same boot, the same.
    s2 = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    assert all_ids(s2) == [*ids, *more]
    # And they do expire when they really are an hour old: the uptime clock governs.
    times.up += HOUR - 55 + 10  # ten seconds past the first ten's hour
    assert all_ids(s2) == [*ids[10:], *more]
    assert s2.dropped["result"] == 10


def test_a_wall_clock_stepped_back_keeps_the_age_limit(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=HOUR), clocks=times.clocks())
    a = s.append("result", "t", payload(0), 1)
    times.wall -= 30 * DAY  # a clock set back (by hand, or a bad time server)
    times.up += HOUR + 1
    b = s.append("result", "t", payload(1), 1)
    assert all_ids(s) == [b]
    assert a is not None and s.dropped["result"] == 1


def test_ages_go_on_across_a_restart_in_the_same_boot(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    path = tmp_path / "spool.db"
    s = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    a = s.append("result", "t", payload(0), 1)
    s.close()
    times.pass_(3000)  # the daemon was stopped for 50 minutes; the device ran on
    s2 = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    b = s2.append("result", "t", payload(1), 1)
    assert all_ids(s2) == [a, b]
    times.pass_(601)
    assert all_ids(s2) == [b]


@pytest.mark.parametrize(("stop", "counted"), [("clean", 900), ("power_cut", 600)])
def test_time_switched_off_does_not_age_messages(
    tmp_path: Path, spools: Callable[..., Spool], times: Times, stop: str, counted: float
) -> None:
    path = tmp_path / "spool.db"
    s = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    a = s.append("result", "t", payload(0), 1)
    times.pass_(600)
    b = s.append("result", "t", payload(1), 1)
    times.pass_(300)
    # A clean stop writes down where the boot's time got to (900 s after `a`); after a power cut
    # the newest message is all there is (600 s after `a`).
    if stop == "clean":
        s.close()
    # Off for a month. The next boot: a new boot id, uptime from zero, fake-hwclock's stale time.
    times.boot, times.up = "boot-2", 20.0
    s2 = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    assert all_ids(s2) == [a, b]
    times.wall += 30 * DAY  # NTP at last
    times.pass_(HOUR - counted)  # `a` has now been waiting an hour of running time, exactly
    assert all_ids(s2) == [a, b]
    times.pass_(1)
    assert all_ids(s2) == [b]


def test_a_spool_from_an_older_edgecam_keeps_its_messages(
    tmp_path: Path, spools: Callable[..., Spool], times: Times
) -> None:
    path = tmp_path / "spool.db"
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, topic TEXT NOT NULL, "
               "payload BLOB NOT NULL, qos INTEGER NOT NULL, created REAL NOT NULL)")
    db.executemany("INSERT INTO outbox VALUES (?, 'result', 't', ?, 1, ?)",
                   [(i, payload(i), times.wall - 10 * DAY) for i in range(1, 6)])
    db.commit()
    db.close()
    s = spools(path, quotas(result_age=HOUR), clocks=times.clocks())
    # Ten days old by the wall clock of the time, which may have been anything: they count from now.
    assert all_ids(s) == [1, 2, 3, 4, 5]
    new = s.append("result", "t", payload(6), 1)
    assert new == 6
    times.pass_(HOUR + 1)
    assert all_ids(s) == []
    assert s.dropped["result"] == 6


# --- a full disk ----------------------------------------------------------------------------------
#
# The spool keeps a reserve free on its filesystem (disk_budget: 5% of it, at least what deleting
# needs): a message is written only if it leaves the reserve, else it is held in memory. An 8 MiB
# tmpfs keeps 410 KiB; 64 KiB messages (an overlay JPEG's size) fill it in a few dozen.

FS_SIZE = 8 * 1024 * 1024
SIZE = 64 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted after the test."""
    with smallfs.tmpfs(tmp_path / "small", FS_SIZE) as mnt:
        yield mnt


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(spool_mod.time, "monotonic", c)
    return c


class Feeder:
    """Appends SIZE-byte messages to a spool, each with its own payload, and remembers them."""

    def __init__(self, s: Spool) -> None:
        self.s = s
        self.sent: dict[int, bytes] = {}

    def one(self) -> int:
        data = payload(len(self.sent), SIZE)
        got = self.s.append("result", "t", data, 1)  # must never raise
        assert got is not None
        self.sent[got] = data
        return got

    def fill_until_memory(self, limit: int = 200, strict: bool = True) -> list[int]:
        """Append until the spool goes to memory; the ids, in order.

        `strict`: the message that did not fit is the one held in memory, and only that one.
        """
        ids: list[int] = []
        for _ in range(limit):
            ids.append(self.one())
            if self.s.state == "memory":
                assert not strict or self.s.counts()["in_memory"] == 1, (
                    f"state is {self.s.state!r} ({self.s.reason}) but {self.s.counts()['in_memory']} held in memory"
                )
                return ids
        pytest.fail(f"the spool never went to memory after {limit} messages of {SIZE} bytes")

    def check(self, s: Spool, ids: list[int]) -> None:
        """`s` has exactly the messages `ids`, in that order, with their payloads."""
        got = s.after(0, 10**6)
        assert [m.id for m in got] == ids
        assert [m.payload for m in got] == [self.sent[i] for i in ids]


def errors_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("edgecam") and r.levelno >= logging.ERROR]


def rows_in_file(path: Path, ids: list[int] | None = None) -> int:
    """COUNT(*) of the outbox (or of those ids), read by a connection of its own."""
    db = sqlite3.connect(str(path))
    try:
        if ids is None:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        marks = ",".join("?" * len(ids))
        return int(db.execute(f"SELECT COUNT(*) FROM outbox WHERE id IN ({marks})", ids).fetchone()[0])
    finally:
        db.close()


@pytest.mark.mounts
def test_full_disk_holds_messages_in_memory_until_space_returns(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Something else takes half the disk; the spool fills the rest, up to the reserve.
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (FS_SIZE // 2))
    s = spools(small_fs / "spool.db")
    assert s.state == "file"
    feed = Feeder(s)

    with caplog.at_level(logging.INFO, logger="edgecam"):
        ids = feed.fill_until_memory()
    assert s.reserve == spool_mod.disk_budget(FS_SIZE)[0] == FS_SIZE // 20  # 5% of 8 MiB
    assert len(ids) >= 10  # a few dozen made it to the file first
    assert s.reason == f"cannot write: disk nearly full, keeping {s.reserve // 1024} KiB free"
    assert s.counts()["in_memory"] == 1  # the one that did not fit, and only that one
    assert free_bytes(small_fs) >= s.reserve  # the reserve was kept
    errors = errors_in(caplog)
    assert len(errors) == 1, errors
    assert str(small_fs / "spool.db") in errors[0]
    assert "disk nearly full" in errors[0]

    # Still within the back-off: more messages are accepted, into memory, quietly.
    clock.now += 1
    with caplog.at_level(logging.INFO, logger="edgecam"):
        ids += [feed.one() for _ in range(4)]
    assert s.state == "memory"
    c = s.counts()
    assert c["in_memory"] == 5
    assert c["waiting"] == len(ids)
    assert c["bytes"] == len(ids) * SIZE
    assert c["dropped_results"] == 0
    assert len(errors_in(caplog)) == 1

    # The sender sees every message: the file's, then memory's, in id order, none lost.
    feed.check(s, ids)
    assert [m.id for m in s.after(ids[-3], 10**6)] == ids[-2:]

    # Space comes back. Within the back-off a new message still queues behind the held ones, in
    # memory: were it written to the file now, it would leave before older messages.
    filler.unlink()
    clock.now += 2
    ids.append(feed.one())
    assert s.state == "memory"
    assert s.counts()["in_memory"] == 6
    feed.check(s, ids)

    # After the back-off the held messages go to the file, before the new one.
    clock.now += 10
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgecam"):
        ids.append(feed.one())
    assert s.state == "file", s.reason
    assert s.reason == ""
    c = s.counts()
    assert c["in_memory"] == 0
    assert c["waiting"] == len(ids)
    feed.check(s, ids)
    assert any("writing to" in m and "again" in m for m in (r.getMessage() for r in caplog.records)), caplog.text
    assert errors_in(caplog) == []

    # They are really in the file: they outlive the spool.
    s.close()
    assert rows_in_file(small_fs / "spool.db") == len(ids)
    s2 = spools(small_fs / "spool.db")
    feed.check(s2, ids)
    s2.delete(ids)
    assert s2.counts()["waiting"] == 0


@pytest.mark.mounts
def test_full_disk_without_space_stays_in_memory(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    s = spools(small_fs / "spool.db")
    feed = Feeder(s)
    with caplog.at_level(logging.INFO, logger="edgecam"):
        ids = feed.fill_until_memory()
        assert s.counts()["in_memory"] == 1
        assert len(errors_in(caplog)) == 1
        # Retries after the back-off find no room again, quietly: no new ERROR line each time,
        # nothing raises, nothing is lost or reordered.
        for _ in range(3):
            clock.now += 10
            ids.append(feed.one())
            assert s.state == "memory"
    assert errors_in(caplog)[1:] == []
    assert not any("again" in r.getMessage() for r in caplog.records)
    feed.check(s, ids)
    assert s.counts()["in_memory"] == 4
    assert s.counts()["waiting"] == len(ids)


@pytest.mark.mounts
def test_the_spool_alone_leaves_the_reserve_free(small_fs: Path, spools: Callable[..., Spool]) -> None:
    # Filled by the spool alone (its WAL included), the filesystem keeps the reserve free, so that
    # acknowledgements can still be deleted and the rest of the system still has room.
    s = spools(small_fs / "spool.db")
    Feeder(s).fill_until_memory()
    assert s.counts()["in_memory"] == 1
    assert free_bytes(small_fs) >= s.reserve, (free_bytes(small_fs), s.reserve)


@pytest.mark.mounts
def test_acks_on_a_full_disk_keep_counts_right(small_fs: Path, spools: Callable[..., Spool]) -> None:
    s = spools(small_fs / "spool.db")
    ids = Feeder(s).fill_until_memory(strict=False)
    on_file = ids[:-1]
    s.delete(on_file[: len(on_file) // 2])  # the broker acknowledged the older half
    # Whatever the file managed, counts() and after() must tell the same story.
    left = s.after(0, 10**6)
    assert [m.id for m in left] == on_file[len(on_file) // 2 :] + ids[-1:]
    c = s.counts()
    assert c["waiting"] == len(left)
    assert c["bytes"] == sum(len(m.payload) for m in left)


@pytest.mark.mounts
@pytest.mark.parametrize("others", [0, FS_SIZE // 2], ids=["spool_alone", "shared_disk"])
def test_acks_on_a_full_disk_make_room_for_held_messages(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, others: int
) -> None:
    # The spool fills the disk alone, or shares it with something else (the system, its logs)
    # that holds half of it.
    if others:
        (small_fs / "filler").write_bytes(b"\0" * others)
    s = spools(small_fs / "spool.db")
    feed = Feeder(s)
    ids = feed.fill_until_memory()
    assert s.counts()["in_memory"] == 1
    held = ids[-1]
    # The broker acknowledges every message in the file, a window at a time as the sender does
    # (edgecam.device.mqtt.WINDOW): deleting works inside the reserve, and the freed pages are room.
    for i in range(0, len(ids) - 1, 16):
        s.delete(ids[i : min(i + 16, len(ids) - 1)])
    assert [m.id for m in s.after(0, 10**6)] == [held]
    assert s.counts()["waiting"] == 1
    clock.now += 10
    new = feed.one()
    assert s.state == "file", s.reason
    assert s.counts()["in_memory"] == 0
    feed.check(s, [held, new])
    s.close()
    assert rows_in_file(small_fs / "spool.db") == 2


@pytest.mark.mounts
def test_deletes_on_a_disk_filled_past_the_reserve_are_done_later(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = small_fs / "spool.db"
    s = spools(path)
    feed = Feeder(s)
    ids = [feed.one() for _ in range(10)]
    assert s.state == "file"
    assert s.counts()["in_memory"] == 0

    # Something else fills the disk completely, reserve and all: even a DELETE needs room (the WAL).
    filler = small_fs / "filler"
    fill_the_disk(filler)
    assert free_bytes(small_fs) < 64 * 1024
    acked, kept = ids[:5], ids[5:]
    with caplog.at_level(logging.INFO, logger="edgecam"):
        s.delete(acked)  # must not raise
    # With secure_delete off a DELETE often fits in the WAL's existing frames even on a full disk;
    # when it does not, the rows stay in the file as tombstones and the failure is logged.
    if rows_in_file(path, acked):
        assert rows_in_file(path, acked) == len(acked)
        assert any("cannot delete" in m for m in errors_in(caplog)), caplog.text
    # ... yet the acknowledged messages are gone for the sender and the counts.
    feed.check(s, kept)
    c = s.counts()
    assert c["waiting"] == len(kept)
    assert c["bytes"] == len(kept) * SIZE
    assert c["dropped_results"] == 0
    # Deleting them again, or others, is harmless.
    s.delete(acked[:2])
    feed.check(s, kept)
    assert s.counts()["waiting"] == len(kept)

    # A new message while the disk is full is held in memory, in order.
    clock.now += 1
    ids.append(feed.one())
    assert s.state == "memory"
    assert s.counts()["in_memory"] == 1
    feed.check(s, [*kept, ids[-1]])

    # Space comes back; after the back-off an append first really deletes the acknowledged rows,
    # then writes the held message and the new one.
    filler.unlink()
    clock.now += 10
    ids.append(feed.one())
    assert s.state == "file", s.reason
    assert s.counts()["in_memory"] == 0
    assert rows_in_file(path, acked) == 0
    assert rows_in_file(path) == len(kept) + 2
    feed.check(s, [*kept, *ids[-2:]])
    assert s.counts()["waiting"] == len(kept) + 2


# --- the reserve in proportion, and a failing disk said once -----------------------------------------

KiB, MiB = 1024, 1024 * 1024


def test_the_reserve_is_a_share_of_the_filesystem_within_bounds() -> None:
    assert spool_mod.disk_budget(2 * MiB) == (160 * KiB, 16)  # what deleting needs: above 5% here
    assert spool_mod.disk_budget(8 * MiB) == (int(8 * MiB * 0.05), 32)
    assert spool_mod.disk_budget(64 * MiB) == (int(64 * MiB * 0.05), 128)
    assert spool_mod.disk_budget(32 * 1024 * MiB) == (16 * MiB, 128)  # an SD card: the cap
    for size in (2**k for k in range(21, 42)):
        reserve, wal_pages = spool_mod.disk_budget(size)
        assert reserve <= 0.08 * size  # a small disk is not "nearly full" at a quarter used
        assert reserve >= 2 * wal_pages * 4096  # deleting always has room for the WAL


@pytest.mark.mounts
@pytest.mark.parametrize(("fs_size", "size", "share"), [(2 * MiB, 1000, 0.80), (64 * MiB, 64 * KiB, 0.90)],
                         ids=["2MiB", "64MiB"])
def test_the_spool_fills_most_of_a_filesystem_and_leaves_the_reserve(
    tmp_path: Path, fs_size: int, size: int, share: float
) -> None:
    with smallfs.tmpfs(tmp_path / "fs", fs_size) as mnt:
        s = Spool(mnt / "spool.db", quotas())
        try:
            n = 0
            while s.state == "file":
                assert n < fs_size // size, "the spool never went to memory"
                s.append("result", "t", payload(n, size), 1)
                n += 1
            reserve = spool_mod.disk_budget(fs_size)[0]
            assert s.reserve == reserve
            assert s.reason == f"cannot write: disk nearly full, keeping {reserve // 1024} KiB free"
            assert smallfs.free_bytes(mnt) >= reserve  # kept free
            # A fixed 1 MiB reserve plus the WAL stopped at 26% on 2 MiB.
            assert smallfs.used_share(mnt) >= share, (smallfs.used_share(mnt), n)
        finally:
            s.close()


@pytest.mark.mounts
def test_a_full_disk_is_said_once_then_once_a_minute_then_once_when_it_is_over(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    s = spools(small_fs / "spool.db")
    feed = Feeder(s)
    with caplog.at_level(logging.INFO, logger="edgecam"):
        on_file = feed.fill_until_memory()
        # The broker is there: each held message goes out and is acknowledged at once, so memory
        # is empty again before every frame (which used to log one error per frame).
        s.delete([on_file.pop()])
        for _ in range(300):  # 75 s at 4 results a second
            clock.now += 0.25
            s.delete([feed.one()])
            assert s.state == "memory"
        s.delete(on_file)  # the file's own messages are delivered too: room again
        clock.now += 10
        last = feed.one()
    assert s.state == "file", s.reason
    feed.check(s, [last])
    lines = spool_lines(caplog)
    assert [lvl for lvl, _ in lines] == [logging.ERROR, logging.WARNING, logging.INFO], lines
    assert "disk nearly full" in lines[0][1]
    # At 60 s: the first held message and the 240 of the first minute.
    assert "still cannot write to" in lines[1][1] and "241 messages since held in memory" in lines[1][1]
    assert "writing to" in lines[2][1] and "again after" in lines[2][1] and "301 messages held" in lines[2][1]


@pytest.mark.mounts
def test_a_read_only_spool_file_is_said_once_and_still_read(
    tmp_path: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    old = written_and_closed(path, 3, 100)
    with smallfs.read_only_file(path), caplog.at_level(logging.INFO, logger="edgecam"):
        s = spools(path)
        assert s.state == "file", s.reason
        feed = Feeder(s)
        # What was waiting is still read and sent; its acknowledgement cannot be written down.
        assert [m.payload for m in s.after(0, 100)] == [payload(i, 100) for i in range(3)]
        s.delete(old)
        for _ in range(300):
            clock.now += 0.25
            got = feed.one()
            assert [m.id for m in s.after(0, 100)] == [got]  # delivered from memory
            s.delete([got])
        assert s.state == "memory" and "readonly" in s.reason
        s.close()
    lines = spool_lines(caplog)
    errors = [m for lvl, m in lines if lvl == logging.ERROR]
    assert len(errors) == 1, lines  # deleting what was delivered failed first: the same trouble as writing
    assert "cannot write to" in errors[0] and "cannot delete delivered messages" in errors[0]
    assert "readonly" in errors[0]
    assert sum(lvl == logging.WARNING for lvl, _ in lines) == 1  # at 60 s
    assert len(lines) == 2


@pytest.mark.mounts
def test_a_file_a_full_disk_kept_closed_at_start_keeps_its_messages_first(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with smallfs.tmpfs(tmp_path / "fs", MiB) as mnt:
        path = mnt / "spool.db"
        old = written_and_closed(path, 5, 100)  # waiting from the last run
        fill_the_disk(mnt / "filler")
        s = Spool(path, quotas())
        try:
            assert s.state == "memory", s.reason  # a full disk cannot even make the WAL's index
            held = [s.append("result", "t", payload(10 + i), 1) for i in range(3)]
            assert None not in held and min(i for i in held if i is not None) > max(old)  # were 1, 2, 3: taken
            assert [m.id for m in s.after(0, 100)] == held
            (mnt / "filler").unlink()
            clock.now += 31  # the next try to open it
            with caplog.at_level(logging.INFO, logger="edgecam"):
                new = s.append("result", "t", payload(20), 1)
            assert s.state == "file", s.reason
            # The sender, wherever its cursor got to, is taken back to the oldest: the file's first.
            assert [m.id for m in s.after(held[-1], 100)] == [*old, *held, new]
            assert [m.id for m in s.after(new, 100)] == []  # once
            assert s.counts()["waiting"] == 9
            assert any("5 messages from before are in" in m for _, m in spool_lines(caplog))
        finally:
            s.close()
        assert rows_in_file(path) == 9


# --- threads --------------------------------------------------------------------------------------


def test_one_writer_one_reader(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db")
    n = 500
    written: list[int | None] = []
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for i in range(n):
                written.append(s.append("result" if i % 7 else "overlay", "t", payload(i, 64), 1))
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        cursor = 0
        try:
            while True:
                finished = done.is_set()  # read before after(): a batch read after this sees everything
                batch = s.after(cursor, 37)
                if batch:
                    seen.extend(m.id for m in batch)
                    s.delete([m.id for m in batch])
                    cursor = batch[-1].id
                elif finished:
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert errors == []

    assert None not in written
    assert len(written) == n
    assert seen == written  # every id exactly once, in the order written
    assert all(a < b for a, b in itertools.pairwise(seen))
    c = s.counts()
    assert c["waiting"] == 0
    assert c["bytes"] == 0
    assert s.after(0, 10**6) == []


class _FullDiskOnDelete:
    """Wraps a connection so DELETE fails as SQLite fails it on a full disk; everything else passes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = True

    def execute(self, sql: str, *args: object) -> object:
        if self.full and sql.lstrip().upper().startswith("DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def test_failed_deletes_become_tombstones_then_happen(
    tmp_path: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    s = spools(path)
    ids = [s.append("result", "t", bytes([i]) * 100, 1) for i in range(6)]
    wrapper = _FullDiskOnDelete(s._db)  # type: ignore[arg-type]
    s._db = wrapper  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="edgecam"):
        s.delete(ids[:3])
        s.delete(ids[3:4])
    assert sum("cannot delete" in r.getMessage() for r in caplog.records) == 1  # said once, not per ack
    assert [m.id for m in s.after(0, 100)] == ids[4:]
    assert s.counts()["waiting"] == 2 and s.counts()["bytes"] == 200
    assert rows_in_file(path, ids[:4]) == 4
    wrapper.full = False
    clock.now += 10
    new = s.append("result", "t", b"x" * 100, 1)
    assert rows_in_file(path, ids[:4]) == 0
    assert [m.id for m in s.after(0, 100)] == [*ids[4:], new]
