"""The durable outbox (edgecam.spool): order, persistence, quotas, and what happens when the file fails.

Every test uses a real SQLite file under tmp_path; the disk-full tests mount a small tmpfs
(root only) and skip otherwise. No test sleeps: ages come from explicit `created` times and
the flush back-off runs on a fake monotonic clock.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT

import edgecam.spool as spool_mod
from edgecam.spool import Message, Quota, Spool

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


@pytest.fixture
def spools() -> Iterator[Callable[..., Spool]]:
    """Open spools with `spools(path, quotas, memory_limit)`; all are closed after the test."""
    opened: list[Spool] = []

    def make(path: Path | None, q: dict[str, Quota] | None = None, memory_limit: int = 1000) -> Spool:
        s = Spool(path, q or quotas(), memory_limit)
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


def test_messages_come_back_in_order_with_their_fields(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db")
    assert s.state == "file"
    assert s.reason == ""
    now = time.time()
    sent = [
        ("result", "edgecam/dev/result", b'{"seq":1}', 1, now - 3.5),
        ("overlay", "edgecam/dev/overlay", b"\xff\xd8\x00jpeg\x00\xff\xd9", 0, now - 2.25),
        ("result", "edgecam/dev/result", b'{"seq":2}', 0, now - 1.0),
        ("result", "other/topic", b"", 1, now),
    ]
    ids = [s.append(kind, topic, data, qos, created) for kind, topic, data, qos, created in sent]
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
    assert s.counts() == {"waiting": 0, "bytes": 0, "in_memory": 0, "dropped_results": 0, "dropped_overlays": 0}
    ids = [s.append("result", "t", payload(i, 100 + i), 1) for i in range(6)]
    ov = s.append("overlay", "o", payload(99, 1000), 1)
    assert s.counts() == {
        "waiting": 7,
        "bytes": sum(100 + i for i in range(6)) + 1000,
        "in_memory": 0,
        "dropped_results": 0,
        "dropped_overlays": 0,
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
    now = time.time()
    ids = [s.append("result", f"t/{i}", payload(i), i % 2, now + i) for i in range(5)]
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
from pathlib import Path
from edgecam.spool import Quota, Spool
q = {{"result": Quota(10**12, 10**12), "overlay": Quota(10**12, 10**12)}}
s = Spool(Path({str(path)!r}), q)
assert s.state == "file", s.reason
ids = [s.append("result", "t/%d" % i, b"payload-%d" % i, 1, 1000.0 + i) for i in range(20)]
ids.append(s.append("overlay", "o", b"jpeg", 0, 2000.0))
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


def test_age_quota(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=60))
    now = time.time()
    old = s.append("result", "t", payload(0), 1, created=now - 120)
    recent = s.append("result", "t", payload(1), 1, created=now - 30)
    new = s.append("result", "t", payload(2), 1, created=now)
    assert None not in (old, recent, new)
    got = s.after(0, 100)
    assert [m.id for m in got] == [recent, new]
    assert [m.created for m in got] == [now - 30, now]
    assert s.dropped["result"] == 1
    c = s.counts()
    assert c["dropped_results"] == 1
    assert c["waiting"] == 2
    assert c["bytes"] == 200


def test_age_quota_drops_every_expired_message(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_age=60, overlay_age=60))
    t0 = 1_000_000.0
    for i in range(5):
        s.append("result", "t", payload(i), 1, created=t0 + i)
    ov = s.append("overlay", "o", payload(50), 1, created=t0)
    keep = s.append("result", "t", payload(5), 1, created=t0 + 10)
    new = s.append("result", "t", payload(6), 1, created=t0 + 65)  # t0..t0+4 are now over 60 s old
    assert all_ids(s) == [ov, keep, new]
    assert s.dropped == {"result": 5, "overlay": 0}


# --- kinds ----------------------------------------------------------------------------------------


def test_kinds_have_separate_quotas(tmp_path: Path, spools: Callable[..., Spool]) -> None:
    s = spools(tmp_path / "spool.db", quotas(result_bytes=1000, overlay_bytes=2000, overlay_age=60))
    results = [s.append("result", "r", payload(i), 1) for i in range(10)]  # the result quota exactly
    t0 = time.time()
    overlays = [s.append("overlay", "o", payload(100 + i, 500), 0, created=t0 + i) for i in range(20)]
    assert None not in overlays
    # And age the overlays out too.
    late = s.append("overlay", "o", payload(200, 500), 0, created=t0 + 1000)

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

    errors = [r for r in caplog.records if r.name == "edgecam" and r.levelno == logging.ERROR]
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


# --- a full disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs, unmounted after the test."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


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


def fill_until_memory(s: Spool, size: int = 2048, limit: int = 500) -> list[int]:
    """Append `size`-byte messages until one has to be held in memory; their ids."""
    ids: list[int] = []
    for i in range(limit):
        got = s.append("result", "t", payload(i, size), 1)  # must never raise
        assert got is not None
        ids.append(got)
        if s.state == "memory":
            return ids
    pytest.fail(f"the filesystem never filled up after {limit} messages")


def test_full_disk_holds_messages_in_memory_until_space_returns(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Something else takes part of the disk; the spool fills the rest.
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * 64 * 1024)
    s = spools(small_fs / "spool.db")
    assert s.state == "file"

    with caplog.at_level(logging.INFO, logger="edgecam"):
        ids = fill_until_memory(s)
    assert len(ids) >= 2  # some made it to the file first
    assert "cannot write" in s.reason
    assert any(r.levelno == logging.ERROR and "cannot write" in r.getMessage() for r in caplog.records)
    assert s.counts()["in_memory"] == 1

    # Still within the back-off: more messages are accepted, into memory.
    clock.now += 1
    for i in range(4):
        got = s.append("result", "t", payload(1000 + i, 2048), 1)
        assert got is not None
        ids.append(got)
    assert s.state == "memory"
    c = s.counts()
    assert c["in_memory"] == 5
    assert c["waiting"] == len(ids)
    assert c["dropped_results"] == 0

    # The sender sees every message: the file's, then memory's, in id order.
    got_msgs = s.after(0, 10**6)
    assert [m.id for m in got_msgs] == ids
    assert all(len(m.payload) == 2048 for m in got_msgs)
    assert [m.id for m in s.after(ids[-3], 10**6)] == ids[-2:]

    # Space comes back. Within the back-off a new message still queues behind the held ones, in
    # memory: were it written to the file now, it would leave before older messages.
    filler.unlink()
    clock.now += 2
    got = s.append("result", "t", payload(1500, 2048), 1)
    assert got is not None
    ids.append(got)
    assert s.state == "memory"
    assert s.counts()["in_memory"] == 6
    assert all_ids(s) == ids

    # After the back-off the held messages go to the file, before the new one.
    clock.now += 10
    with caplog.at_level(logging.INFO, logger="edgecam"):
        last = s.append("result", "t", payload(2000, 2048), 1)
    assert last is not None
    ids.append(last)
    assert s.state == "file", s.reason
    assert s.reason == ""
    c = s.counts()
    assert c["in_memory"] == 0
    assert c["waiting"] == len(ids)
    assert all_ids(s) == ids
    assert any("writing to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)

    # They are really in the file: they outlive the spool.
    s.close()
    s2 = spools(small_fs / "spool.db")
    assert all_ids(s2) == ids
    s2.delete(ids)
    assert s2.counts()["waiting"] == 0


def test_full_disk_without_space_stays_in_memory(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock
) -> None:
    s = spools(small_fs / "spool.db")
    ids = fill_until_memory(s)
    # Retries after the back-off fail again, quietly: nothing raises, nothing is lost or reordered.
    for i in range(3):
        clock.now += 10
        got = s.append("result", "t", payload(3000 + i, 2048), 1)
        assert got is not None
        ids.append(got)
        assert s.state == "memory"
    assert all_ids(s) == ids
    assert s.counts()["in_memory"] == 4
    assert s.counts()["waiting"] == len(ids)


def test_acks_on_a_full_disk_keep_counts_right(small_fs: Path, spools: Callable[..., Spool]) -> None:
    s = spools(small_fs / "spool.db")
    ids = fill_until_memory(s)
    on_file = ids[:-1]
    s.delete(on_file[: len(on_file) // 2])  # the broker acknowledged the older half
    # Whatever the file managed, counts() and after() must tell the same story.
    assert s.counts()["waiting"] == len(s.after(0, 10**6))


def test_acks_on_a_full_disk_make_room_for_held_messages(
    small_fs: Path, spools: Callable[..., Spool], clock: FakeClock
) -> None:
    s = spools(small_fs / "spool.db")
    ids = fill_until_memory(s)
    s.delete(ids[:-1])  # every message in the file was acknowledged
    clock.now += 10
    new = s.append("result", "t", payload(4000, 2048), 1)
    assert all_ids(s) == [ids[-1], new]
    assert s.state == "file", s.reason


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
