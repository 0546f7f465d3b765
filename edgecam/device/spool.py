"""The durable outbox: every result waits here, in order, until the broker acknowledges it.

SQLite in WAL mode, one row per message with an id that only grows, so messages
leave in the order they were made, across broker outages and process restarts.
Bounded by size and age; when full, the configured policy drops the oldest or the
newest, and counts what it dropped.

Ages are measured on the spool's own time line, not the wall clock: CLOCK_BOOTTIME
within a boot, carried over from one boot to the next without the time switched off,
so NTP stepping a clock that booted on a stale time (a Pi has no RTC) expires nothing.

When the file cannot be used (disk full, unwritable, corrupt), messages are held in
memory instead, up to a count, and written to the file as soon as it works again;
the log says so once, then once a minute with a count, then once when it works again.
A corrupt file found at start-up is moved aside, never deleted, and what SQLite can
still read from it is put back into the new one, ahead of new messages.

Each run of the daemon (the contract's `boot`) has a row in `runs`, so that the next run can tell
consumers how the previous one ended and what it may have lost (see begin_run).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecam.contract import result_identity
from edgecam.core.errors import EdgecamError
from edgecam.device.clock import Clocks

log = logging.getLogger(__name__)

# Room the spool leaves free on its filesystem: RESERVE_SHARE of it, at most RESERVE_MAX, and
# never less than deleting needs (the WAL can grow by its limit before it is folded back, plus
# its index file). The WAL's limit scales with the filesystem too, so a 2 MiB disk is usable.
RESERVE_SHARE = 0.05
RESERVE_MAX = 16 * 1024 * 1024
WAL_PAGES_MIN, WAL_PAGES_MAX = 16, 128
SHM_BYTES = 32 * 1024
PAGE_SIZE = 4096  # SQLite's default, which the spool keeps
CACHE_KIB = 256  # SQLite page cache, in KiB
# A run reserves seqs this far ahead of the result it commits, in a commit made durable at once
# (synchronous=FULL for that one commit: an fsync of the WAL, which makes every commit before it
# durable too). One fsync per RESERVE_SEQS results, not per result: a power cut can lose at most
# the results after the newest durable one up to the reservation, and the next run counts them.
RESERVE_SEQS = 32
KEEP_RUNS = 16  # rows of `runs` kept: the previous run is the one read
FAR_ID = 1 << 40  # first id when a file that could not be read may hold any ids below
REPORT_EVERY = 60.0  # seconds between "still failing" log lines

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    stamp REAL
);
CREATE TABLE IF NOT EXISTS clock (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    boot TEXT NOT NULL,
    offset REAL NOT NULL,
    last REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    n INTEGER PRIMARY KEY,
    boot TEXT NOT NULL,              -- the contract's per-process id
    kernel TEXT NOT NULL,            -- the kernel's boot id the run ran under
    reserved INTEGER NOT NULL DEFAULT 0,  -- no result above this seq was made (durable)
    last_seq INTEGER NOT NULL DEFAULT 0,  -- every result up to it is durable or was delivered
    clean INTEGER NOT NULL DEFAULT 0,     -- the run closed its spool
    told INTEGER NOT NULL DEFAULT 0,      -- the broker acknowledged a stats message of the run
    ended TEXT                            -- how it ended, as the run after it found (RUN_ENDS)
);
"""
COLUMNS = "id, kind, topic, payload, qos, created, stamp"


@dataclass(frozen=True)
class Message:
    id: int
    kind: str  # "result" or "overlay": each kind has its own quota
    topic: str
    payload: bytes
    qos: int
    created: float  # wall-clock seconds, as the clock said then (informative: ages use `stamp`)
    # The spool's own time when stored (see Spool.now); what ages are measured on.
    stamp: float = field(default=0.0, compare=False, repr=False)
    seq: int = field(default=0, compare=False, repr=False)  # a result's seq in its run; 0: none


@dataclass(frozen=True)
class PreviousRun:
    """How the run before this one ended, as the spool can tell.

    end: "clean" (it closed its spool), "killed" (not closed, same kernel boot: the page cache
    kept every commit, so nothing was lost) or "power_cut" (not closed, a new kernel boot: the
    commits after the last durable one may be lost). Results up to `last_seq` were durable or
    delivered; `lost_at_most` is an upper bound of those after it that may be lost."""

    boot: str
    end: str
    last_seq: int
    lost_at_most: int
    # Runs before it that did not stop and whose own report never reached the broker (the run after
    # each ended before a stats message of it was acknowledged): told now, newest first.
    earlier: tuple[PreviousRun, ...] = ()

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"boot": self.boot, "end": self.end, "last_seq": self.last_seq,
                                  "lost_at_most": self.lost_at_most}
        if self.earlier:
            out["earlier"] = [e.to_json() for e in self.earlier]
        return out


@dataclass
class Quota:
    max_bytes: int
    max_age: float  # seconds
    policy: str = "drop_oldest"  # or drop_newest


def disk_budget(fs_bytes: int, page_size: int = PAGE_SIZE) -> tuple[int, int]:
    """(bytes to leave free, WAL pages before a checkpoint) for a filesystem of `fs_bytes`.

    The WAL gets a 64th of the filesystem (16 to 128 pages); the reserve is RESERVE_SHARE of
    it, within [twice the WAL plus its index, RESERVE_MAX]. A 2 MiB disk keeps 160 KiB free
    (the fixed 1 MiB of before, plus the WAL, made it "nearly full" at a quarter used).
    """
    wal_pages = max(WAL_PAGES_MIN, min(WAL_PAGES_MAX, fs_bytes // 64 // page_size))
    floor = 2 * wal_pages * page_size + SHM_BYTES
    reserve = max(floor, min(RESERVE_MAX, int(fs_bytes * RESERVE_SHARE)))
    return reserve, wal_pages


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Outage:
    """The log of one kind of failure: one line when it starts, one every REPORT_EVERY s while
    it lasts (with how many messages it touched), one when it ends. Never a line per frame."""

    def __init__(self, what: str, path: Path | None, counted: str) -> None:
        self.what = what  # "write to" or "read"
        self.path = path
        self.counted = counted  # what `count` counts, for the log
        self.since: float | None = None
        self.reason = ""
        self.count = 0  # since the last line
        self.total = 0
        self._next = 0.0

    @property
    def on(self) -> bool:
        return self.since is not None

    def failed(self, reason: str, now: float, then: str) -> None:
        self.reason = reason
        if self.since is None:
            self.since, self._next, self.count, self.total = now, now + REPORT_EVERY, 0, 0
            log.error("spool: cannot %s %s (%s); %s", self.what, self.path, reason, then)

    def touched(self, now: float, n: int = 1) -> None:
        """n messages were held (or reads failed) because of it; says so once a minute."""
        if self.since is None:
            return
        self.count += n
        self.total += n
        if now >= self._next:
            log.warning("spool: still cannot %s %s (%s) after %s; %d %s",
                        self.what, self.path, self.reason, _ago(now - self.since), self.count, self.counted)
            self.count, self._next = 0, now + REPORT_EVERY

    def ended(self, now: float, detail: str) -> None:
        if self.since is not None:
            log.info("spool: %s %s again after %s (%d %s; %s)",
                     "writing to" if self.what == "write to" else "reading", self.path,
                     _ago(now - self.since), self.total, self.counted.replace(" since ", " "), detail)
            self.since = None


_HELD: dict[Path, int] = {}  # spool file -> the open lock file that says this process writes it


def hold(path: Path) -> None:
    """One daemon per spool file, or EdgecamError naming the process that has it.

    Two would each send and delete the other's rows, and the second would read the first's live run
    as one that was killed. A hand-run `sudo edgecam run` beside the service picks the same state
    directory and device id, so this is what a field engineer meets first. The lock is an flock on
    `<spool>.lock`, held until the process ends (also by SIGKILL) or execs (a reload: the file is
    opened close-on-exec, so the new image takes it again). A lock that cannot be made (a read-only
    place, a filesystem without flock) is no reason to stop: the spool itself then says what it can do.
    """
    lock = path.with_name(path.name + ".lock")
    if lock in _HELD:
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise EdgecamError(
            f"{path}: another edgecam run (PID {holder or 'unknown'}) is using this spool; run one daemon per "
            "device id and spool directory (--device-id, spool.dir), or stop the other (systemctl stop edgecam)"
        ) from None
    except OSError:
        os.close(fd)
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[lock] = fd


class Spool:
    """Thread-safe. One writer (the loop) and one reader (the sender) are the expected users."""

    def __init__(
        self, path: Path | None, quotas: dict[str, Quota], memory_limit: int = 1000, clocks: Clocks | None = None
    ) -> None:
        self.path = path
        self.quotas = quotas
        self.memory_limit = memory_limit
        self.clocks = clocks or Clocks()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._mem: deque[Message] = deque()  # held while the file cannot take them; always newest
        # Acknowledged ids whose DELETE failed (a full disk refuses even that: WAL needs room).
        # They count as gone and are skipped; the DELETE is tried again before the next writes.
        self._tombstones: set[int] = set()
        self._bytes: dict[str, int] = dict.fromkeys(quotas, 0)
        self._count: dict[str, int] = dict.fromkeys(quotas, 0)
        self.dropped: dict[str, int] = dict.fromkeys(quotas, 0)
        self.lost_corrupt = 0  # messages in a corrupt file that could not be read back
        self.state = "memory"  # "file" or "memory"
        self.reason = "no spool file configured" if path is None else ""
        self._next_id = 1
        self._retry_at = 0.0
        self.reserve = 0  # bytes left free on the spool's filesystem, set when the file is opened
        self._room_left, self._room_until = 0, 0.0  # what may be written before the disk is asked again
        self.wal_pages = WAL_PAGES_MAX
        self._stamp = "stamp"  # the column ages are read from ("NULL" in an old file that cannot take it)
        self.waiting_at_start = 0
        self._writes = Outage("write to", path, "messages since held in memory")
        self._reads = Outage("read", path, "reads since failed")
        # Spool time = this boot's uptime + offset; the offset carries the time line across boots.
        self._boot = self.clocks.boot()
        self._offset = -self.clocks.uptime()
        self._expired_at: float | None = None  # spool time after() last expired every kind
        self._rewind = False  # the next after() reads from the oldest, whatever the sender's cursor
        self._run: int | None = None  # this run's row in `runs` (begin_run)
        self._reserved = 0  # seqs reserved durably for this run
        self._seq = 0  # the highest seq appended in this run
        if path is not None:
            self._open(path)

    def now(self) -> float:
        """The spool's time: seconds on a line that never steps, without the time switched off."""
        return self.clocks.uptime() + self._offset

    # -- set-up -------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
        salvaged: list[Message] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect(path)
        except sqlite3.DatabaseError as exc:
            if _is_corrupt(exc) and path.exists():
                aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                for suffix in ("", "-wal", "-shm"):
                    src = Path(str(path) + suffix)
                    if src.exists():
                        src.replace(Path(str(aside) + suffix))
                log.error("spool: %s is corrupt (%s); moved aside to %s, starting a new one", path, exc, aside.name)
                salvaged = self._salvage(aside)
                try:
                    db = self._connect(path)
                except (sqlite3.Error, OSError) as exc2:
                    self._memory_only(f"cannot create {path}: {exc2}")
                    self._hold_salvaged(salvaged)
                    return
            else:
                self._memory_only(f"cannot open {path}: {exc}")
                self._ids_above(path)
                return
        except OSError as exc:
            self._memory_only(f"cannot open {path}: {exc.strerror or exc}")
            self._ids_above(path)
            return
        self._db = db
        self.state, self.reason = "file", ""
        self.waiting_at_start = self._adopt(db)
        self._hold_salvaged(salvaged)

    def _adopt(self, db: sqlite3.Connection) -> int:
        """Take up a file just opened: its time line, its messages in the counts, new ids above its
        own. Returns how many messages it holds."""
        before = self._offset
        self._start_time_line(db)
        if self._mem and self._offset != before:  # held messages move onto the file's time line
            self._mem = deque(replace(m, stamp=m.stamp + self._offset - before) for m in self._mem)
        held = 0
        for kind, n, size, top in db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MAX(id) FROM outbox GROUP BY kind"
        ):
            if kind in self._count:
                self._count[kind] += int(n)
                self._bytes[kind] += int(size)
                held += int(n)
            self._next_id = max(self._next_id, int(top) + 1)
        return held

    def _ids_above(self, path: Path) -> None:
        """A file that cannot be opened now (a full disk cannot even make its index file) may hold
        messages: new ids start above them, so that they can go in when it opens. Read without
        writing anything; when the file has a WAL that cannot be read that way, far above."""
        if not path.exists():
            return
        wal = Path(f"{path}-wal")
        top = None
        if not wal.exists() or wal.stat().st_size == 0:
            with contextlib.suppress(sqlite3.Error):
                db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
                try:
                    top = db.execute("SELECT MAX(id) FROM outbox").fetchone()[0]
                finally:
                    db.close()
        self._next_id = max(self._next_id, int(top) + 1 if isinstance(top, int) else FAR_ID)

    def _connect(self, path: Path) -> sqlite3.Connection:
        try:
            st = os.statvfs(path.parent)
            self.reserve, self.wal_pages = disk_budget(st.f_blocks * st.f_frsize)
        except OSError:
            pass  # the connect below says what is wrong with the place
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed message survives the process being killed;
            # a power cut may lose the last moments. FULL would fsync every frame.
            db.execute("PRAGMA synchronous=NORMAL")
            # Small WAL, folded back often and cut back after: a checkpoint can grow the file by
            # the WAL's size at once, which the reserve has to cover.
            db.execute(f"PRAGMA wal_autocheckpoint={self.wal_pages}")
            db.execute(f"PRAGMA journal_size_limit={self.wal_pages * PAGE_SIZE}")
            # Zeroing freed pages (on in some builds) makes a delete write as much as it frees.
            db.execute("PRAGMA secure_delete=OFF")
            # The outbox is written and read in order, so a small page cache does (SQLite's default
            # is 2 MB): a long outage should not show up as resident memory on a 512 MB Zero 2 W.
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            try:
                db.executescript(SCHEMA)
                if "stamp" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
                    db.execute("ALTER TABLE outbox ADD COLUMN stamp REAL")  # a spool from before it had a clock
                have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
                for column, kind in (("told", "INTEGER NOT NULL DEFAULT 0"), ("ended", "TEXT")):
                    if column not in have:  # runs as first kept, before these
                        db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc):
                    raise
                # A read-only file can still be read and sent from (writes are held in memory); the
                # ages of messages in a file from before the spool had its own clock count from now.
                if "stamp" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
                    self._stamp = "NULL"
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
        except BaseException:
            db.close()
            raise
        return db

    def _start_time_line(self, db: sqlite3.Connection) -> None:
        """Carry the spool's time line on from the file: the same boot keeps its offset; a new boot
        starts where the last one ended (its last clean stop, or its newest message), so the time
        switched off does not age anything."""
        self._offset = carried_offset(_line_of(db), self._boot, self.clocks.uptime())
        self._record_time_line(db)
        with contextlib.suppress(sqlite3.Error):
            # Messages from before the spool had its own clock: their age counts from now.
            db.execute("UPDATE outbox SET stamp = ? WHERE stamp IS NULL", (self.now(),))

    def _record_time_line(self, db: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            db.execute("INSERT OR REPLACE INTO clock (one, boot, offset, last) VALUES (1, ?, ?, ?)",
                       (self._boot, self._offset, self.now()))

    def _memory_only(self, reason: str) -> None:
        self._db = None
        self.state, self.reason = "memory", reason
        self._writes.failed(reason.removeprefix(f"cannot open {self.path}: "), time.monotonic(),
                            f"messages are held in memory only (up to {self.memory_limit}) until it works")
        self._retry_at = time.monotonic() + 30

    # -- salvage ------------------------------------------------------------------------
    def _salvage(self, aside: Path) -> list[Message]:
        """What SQLite can still read from a corrupt file, in order, with the ages they had there (from
        now where the file's time line cannot be read); the rest is counted as lost."""
        rows, lost, exact = salvage(aside, set(self.quotas))
        up = self.clocks.uptime()
        line: Line = (None, None)
        with contextlib.suppress(sqlite3.Error):
            db = _read_only(aside)
            try:
                line = _line_of(db)
            finally:
                db.close()
        then, now = up + carried_offset(line, self._boot, up), self.now()
        msgs = [Message(i, k, t, p, q, c, now - max(0.0, then - st) if st is not None else now)
                for i, k, t, p, q, c, st in rows]
        self.lost_corrupt += lost
        unknown = "" if exact else " (and the damage hid a stretch whose size SQLite cannot tell)"
        if rows or lost:
            log.warning("spool: %d messages read back from %s into the new spool; %d could not be read and are "
                        "lost%s", len(msgs), aside.name, lost, unknown)
        else:
            log.warning("spool: nothing could be read back from %s", aside.name)
        return msgs

    def _hold_salvaged(self, msgs: list[Message]) -> None:
        """Salvaged messages go first: ids from the old file, which the new one continues above."""
        if not msgs:
            return
        self._next_id = max(self._next_id, msgs[-1].id + 1)
        for m in msgs:
            self._count[m.kind] += 1
            self._bytes[m.kind] += len(m.payload)
        self._mem.extend(msgs)
        self._retry_at = 0.0
        self._flush_memory(quiet=True)
        self._bound_memory()

    # -- the writer ---------------------------------------------------------------------
    def append(self, kind: str, topic: str, payload: bytes, qos: int, seq: int = 0) -> int | None:
        """Store one message; returns its id, or None when the quota's policy dropped it. `seq`: a
        result's seq in this run, which the run's reservation covers (see begin_run)."""
        with self._lock:
            created, now = self.clocks.wall(), self.now()
            self._seq = max(self._seq, seq)
            quota = self.quotas[kind]
            if len(payload) > quota.max_bytes:
                self.dropped[kind] += 1
                return None
            self._expire(kind, now)
            while self._bytes[kind] + len(payload) > quota.max_bytes and self._count[kind]:
                if quota.policy == "drop_newest":
                    self.dropped[kind] += 1
                    return None
                self._drop_oldest(kind)
            msg = Message(self._next_id, kind, topic, payload, qos, created, now, seq)
            self._next_id += 1
            self._count[kind] += 1
            self._bytes[kind] += len(payload)
            # One way into the file: behind whatever is held, so nothing overtakes an older message.
            self._mem.append(msg)
            self._flush_memory()
            if self._mem:
                self._writes.touched(time.monotonic())
            self._bound_memory()
            return msg.id

    def _bound_memory(self) -> None:
        while len(self._mem) > self.memory_limit:
            old = self._mem.popleft()
            self._forget(old.kind, len(old.payload))
            self.dropped[old.kind] += 1

    def _room_for(self, size: int) -> bool:
        """Whether writing `size` bytes still leaves the reserve free.

        The spool must never take the last bytes of the disk: on a full disk SQLite cannot
        even delete (the WAL needs room), so acknowledged messages could never make space.
        Pages SQLite freed itself count as room.
        """
        assert self.path is not None and self._db is not None
        need, now = 2 * size, time.monotonic()
        # Asking the filesystem and SQLite costs more than the insert itself; between two asks (at
        # most a second apart) writes may use half of the headroom the last one found.
        if now < self._room_until and need <= self._room_left:
            self._room_left -= need
            return True
        try:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
            pages, page_size = (self._db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_size"))
        except (OSError, sqlite3.Error):
            return True  # no figure: let the write itself tell
        wal = Path(str(self.path) + "-wal")
        pending = wal.stat().st_size if wal.exists() else 0  # what a checkpoint may add to the file
        left = free + pages * page_size - pending - need - self.reserve
        self._room_left, self._room_until = max(0, left // 2), now + 1.0
        return left >= 0

    def _write_failed(self, reason: str) -> None:
        self.state, self.reason = "memory", f"cannot write: {reason}"
        self._writes.failed(reason, time.monotonic(), "holding messages in memory until it can")
        self._retry_at = time.monotonic() + 5

    def _flush_memory(self, quiet: bool = False) -> None:
        """Move held messages into the file, oldest first, when it takes writes (again)."""
        if not (self._mem or self._tombstones) or time.monotonic() < self._retry_at:
            return
        if self._db is None:
            if self.path is None:
                return
            self._retry_at = time.monotonic() + 30
            try:
                self._db = self._connect(self.path)
            except (sqlite3.Error, OSError):
                return
            waiting = self._adopt(self._db)
            if waiting:
                # Messages from before the file could not be opened: the sender starts again from
                # the oldest (those it already has in flight may go twice; QoS 1 allows that).
                self._rewind = True
                log.info("spool: %d messages from before are in %s; they go out now, before the held ones",
                         waiting, self.path)
        if self._tombstones:
            failed = self._retry_deletes()
            if failed is not None:
                if self._mem:  # held because of it
                    self._write_failed(failed)
                self._retry_at = time.monotonic() + 5
                return
        if not self._mem:
            return
        if not self._room_for(sum(len(m.payload) for m in self._mem)):
            self._write_failed(f"disk nearly full, keeping {self.reserve // 1024} KiB free")
            return
        top = max(m.seq for m in self._mem)
        reserve = self._run is not None and top > self._reserved
        try:
            if reserve:
                # This one commit is fsynced (see RESERVE_SEQS); set outside the transaction.
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN")
            rows = [(m.id, m.kind, m.topic, m.payload, m.qos, m.created, m.stamp) for m in self._mem]
            if self._stamp == "stamp":
                self._db.executemany(f"INSERT INTO outbox ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            else:  # an old file that could not take the column (read-only): this says why it fails
                self._db.executemany(f"INSERT INTO outbox ({COLUMNS[:-7]}) VALUES (?, ?, ?, ?, ?, ?)",
                                     [r[:-1] for r in rows])
            if reserve:
                self._db.execute("UPDATE runs SET reserved = ?, last_seq = ? WHERE n = ?",
                                 (top + RESERVE_SEQS, top, self._run))
            elif self._run is not None and top > 0:
                # In the same commit, so no extra fsync: after a kill (the page cache kept it) the next
                # run knows the exact last seq, also of results delivered and deleted since; after a
                # power cut, what survived of it still matches the rows that survived with it.
                self._db.execute("UPDATE runs SET last_seq = ? WHERE n = ?", (top, self._run))
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._write_failed(str(exc))
            return
        finally:
            if reserve:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA synchronous=NORMAL")
        if reserve:
            self._reserved = top + RESERVE_SEQS
        saved = len(self._mem)
        self._mem.clear()
        self.state, self.reason = "file", ""
        if self._writes.on and not quiet:
            self._writes.ended(time.monotonic(), f"{saved} still waiting were written to it")
        self._writes.since = None

    def _retry_deletes(self) -> str | None:
        """Delete the acknowledged rows a full disk kept (frees pages for the held messages); why not."""
        assert self._db is not None
        with contextlib.suppress(sqlite3.Error):
            # Folding the WAL back into the file and truncating it is what frees room on a full disk.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        ids = tuple(self._tombstones)
        try:
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)
        except sqlite3.Error as exc:
            return str(exc)
        self._tombstones.clear()
        return None

    def _rollback(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _select(self, sql: str, args: tuple[object, ...]) -> list[Message]:
        """Rows of the file as messages; a read that fails is logged (not every time) and reads as none."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute(
                f"SELECT id, kind, topic, payload, qos, created, {self._stamp} FROM outbox {sql}", args
            ).fetchall()
        except sqlite3.Error as exc:
            now = time.monotonic()
            self._reads.failed(str(exc), now, "messages in it wait until it can be read")
            self._reads.touched(now)
            return []
        if self._reads.on:
            self._reads.ended(time.monotonic(), "nothing was lost")
        stamp_now = self.now()
        return [Message(i, k, t, _blob(p), q, c, stamp_now if s is None else s) for i, k, t, p, q, c, s in rows]

    def _oldest(self, kind: str) -> Message | None:
        for m in self._select("WHERE kind = ? ORDER BY id LIMIT ?", (kind, 1 + len(self._tombstones))):
            if m.id not in self._tombstones:
                return m
        return next((m for m in self._mem if m.kind == kind), None)

    def _drop_oldest(self, kind: str) -> None:
        old = self._oldest(kind)
        if old is None:
            self._count[kind], self._bytes[kind] = 0, 0
            return
        self._delete_locked([old.id])
        self.dropped[kind] += 1

    def _expire(self, kind: str, now: float) -> None:
        cutoff = now - self.quotas[kind].max_age
        while self._count[kind]:
            old = self._oldest(kind)
            if old is None or old.stamp >= cutoff:
                return
            self._delete_locked([old.id])
            self.dropped[kind] += 1

    # -- the sender ---------------------------------------------------------------------
    def after(self, cursor: int, limit: int) -> list[Message]:
        """Up to `limit` messages with id > cursor, oldest first; none past its kind's age."""
        with self._lock:
            # Appends expire only their own kind; a kind that stopped coming is expired here,
            # once a second at most (the sender reads after every result).
            now = self.now()
            if self._expired_at is None or abs(now - self._expired_at) >= 1.0:
                self._expired_at = now
                for kind in self.quotas:
                    self._expire(kind, now)
            if self._rewind:
                cursor, self._rewind = 0, False
            rows = self._select("WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit + len(self._tombstones)))
            rows = [m for m in rows if m.id not in self._tombstones][:limit]
            rows += [m for m in self._mem if m.id > cursor][: max(0, limit - len(rows))]
            return rows

    def delete(self, ids: list[int]) -> None:
        """Acknowledged messages leave the spool."""
        if ids:
            with self._lock:
                self._delete_locked(ids)

    def _delete_locked(self, ids: list[int]) -> None:
        wanted = set(ids) - self._tombstones
        if self._db is not None and wanted:
            marks = ",".join("?" * len(wanted))
            unread = False
            try:
                sizes = self._db.execute(
                    f"SELECT id, kind, LENGTH(payload) FROM outbox WHERE id IN ({marks})", tuple(wanted)
                ).fetchall()
            except sqlite3.Error as exc:
                now = time.monotonic()
                self._reads.failed(str(exc), now, "messages in it wait until it can be read")
                self._reads.touched(now)
                sizes, unread = [], True
            try:
                if sizes or unread:  # else held in memory only: nothing to delete in the file
                    self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", tuple(wanted))
            except sqlite3.Error as exc:
                self._tombstones.update(i for i, _, _ in sizes)
                # The same trouble as a write that fails (it is one): said once, and new messages wait
                # in memory behind the deletes, which are tried again first.
                self._write_failed(f"cannot delete delivered messages: {exc}")
            for _, kind, size in sizes:
                self._forget(kind, size)
        if self._mem:
            kept: deque[Message] = deque()
            for m in self._mem:
                if m.id in wanted:
                    self._forget(m.kind, len(m.payload))
                else:
                    kept.append(m)
            self._mem = kept

    def _forget(self, kind: str, size: int) -> None:
        self._count[kind] = max(0, self._count[kind] - 1)
        self._bytes[kind] = max(0, self._bytes[kind] - size)

    # -- runs ---------------------------------------------------------------------------
    def begin_run(self, boot: str) -> PreviousRun | None:
        """Record this run (the contract's `boot`) and say how the one before it ended; None when the
        file cannot tell (no file, a file from before runs were kept, a first start)."""
        with self._lock:
            if self._db is None:
                return None
            try:
                try:
                    previous = previous_run(self._db, self._boot)
                except DamagedRun as exc:  # a row no run of edgecam wrote: the run is recorded all the same
                    log.warning("spool: %s: the previous run's row is damaged (%s); how it ended is unknown",
                                self.path, exc)
                    previous = None
                self._db.execute("BEGIN")
                if previous is not None:  # what the runs after it will read, should this one not tell it
                    self._db.execute("UPDATE runs SET ended = ?, last_seq = ? WHERE n = (SELECT MAX(n) FROM runs)",
                                     (previous.end, previous.last_seq))
                n = self._db.execute("INSERT INTO runs (boot, kernel) VALUES (?, ?)", (boot, self._boot)).lastrowid
                self._db.execute("DELETE FROM runs WHERE n <= ?", ((n or 0) - KEEP_RUNS,))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                log.warning("spool: cannot record this run in %s (%s); a power cut during it goes uncounted",
                            self.path, exc)
                return None
            self._run, self._reserved, self._seq = n, 0, 0
            return previous

    def told(self) -> None:
        """The broker acknowledged a stats message of this run: what it reports about the runs before it
        reached consumers, and the next run need not repeat it."""
        with self._lock:
            if self._db is not None and self._run is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("UPDATE runs SET told = 1 WHERE n = ?", (self._run,))

    # -- status -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": sum(self._count.values()),
                "bytes": sum(self._bytes.values()),
                "in_memory": len(self._mem),
                **{f"dropped_{k}s": v for k, v in self.dropped.items()},
                "lost_corrupt": self.lost_corrupt,
            }

    def close(self) -> None:
        with self._lock:
            self._flush_memory()
            if self._db is not None and self._run is not None and not self._mem:
                with contextlib.suppress(sqlite3.Error):
                    # Made durable by the checkpoint below; the next run reads a clean end.
                    self._db.execute("UPDATE runs SET clean = 1, last_seq = MAX(last_seq, ?) WHERE n = ?",
                                     (self._seq, self._run))
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    # Where this boot's time line got to: the next boot carries on from here.
                    self._db.execute("UPDATE clock SET last = ? WHERE one = 1", (self.now(),))
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None


Line = tuple[tuple[str, float, float] | None, float | None]


def _line_of(db: sqlite3.Connection) -> Line:
    """A file's time line as stored: its clock row (boot, offset, last) and its newest message's stamp."""
    row = newest = None
    with contextlib.suppress(sqlite3.Error):
        got = db.execute("SELECT boot, offset, last FROM clock WHERE one = 1").fetchone()
        row = (str(got[0]), float(got[1]), float(got[2])) if got else None
    with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
        got = db.execute("SELECT stamp FROM outbox WHERE stamp IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        newest = float(got[0]) if got else None
    return row, newest


def carried_offset(line: Line, boot: str, up: float) -> float:
    """The offset from this boot's uptime to a file's time line, carried on from it: the same boot
    keeps its offset; a new boot starts where the last one ended (its last clean stop, or its newest
    message), so the time switched off does not age anything."""
    row, newest = line
    if row is not None and boot and row[0] == boot:
        return row[1]
    return max(row[2] if row else 0.0, newest or 0.0) - up


def previous_run(db: sqlite3.Connection, kernel: str) -> PreviousRun | None:
    """How the newest run in a file ended, for a run starting under the kernel boot id `kernel`."""
    rows = db.execute("SELECT boot, kernel, reserved, last_seq, clean, told, ended FROM runs ORDER BY n DESC"
                      ).fetchall()
    if not rows:
        return None
    boot, ran_under, reserved, last, clean = _run_row(rows[0])
    # The runs before it whose end was never told: each was reported only by the run after it, and that
    # run's stats never reached the broker (it ended first, the broker away all along).
    earlier = []
    for after, run in itertools.pairwise(rows):
        if after[5]:  # the run after it told its end
            break
        try:
            b, _, r, s, _ = _run_row(run)
        except DamagedRun:  # what it said is unknown, and so is any run before it
            break
        if run[6] in ("killed", "power_cut"):
            earlier.append(PreviousRun(b, run[6], s, min(RESERVE_SEQS, max(0, r - s)) if run[6] == "power_cut" else 0))
    # Results after the last reservation are durable only as rows of the outbox (those delivered are
    # gone: the bound then counts them too, and a consumer that has them knows).
    newest = db.execute("SELECT payload FROM outbox WHERE kind = 'result' ORDER BY id DESC LIMIT 1").fetchone()
    made = result_identity(_blob(newest[0])) if newest else None
    if made is not None and made[0] == boot and 0 <= made[1] <= MAX_SEQ:
        last = max(last, made[1])
    if clean:
        return PreviousRun(boot, "clean", last, 0, tuple(earlier))
    if kernel and ran_under == kernel:
        return PreviousRun(boot, "killed", last, 0, tuple(earlier))
    # A reservation is made RESERVE_SEQS ahead of the seq it records: no more can be lost.
    return PreviousRun(boot, "power_cut", last, min(RESERVE_SEQS, max(0, reserved - last)), tuple(earlier))


MAX_SEQ = (1 << 63) - 1  # SQLite's largest integer


def _blob(payload: object) -> bytes:
    """A payload as stored: a blob, or what a file not written by edgecam holds there (TEXT, a number:
    bytes(1000000) would be a megabyte of zeros, bytes('x') raises)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return str(payload).encode("utf-8", "surrogateescape")


class DamagedRun(ValueError):
    """A row of `runs` that no run of edgecam wrote (a type, a size, a boot id it never makes)."""


def _run_row(row: tuple[Any, ...]) -> tuple[str, str, int, int, bool]:
    """(boot, kernel, reserved, last_seq, clean) of a row of `runs`, checked: what it says goes out in
    every stats message, which consumers refuse whole when it is not a boot id and whole numbers."""
    boot, kernel, reserved, last, clean = row[:5]
    if not (isinstance(boot, str) and 0 < len(boot) <= 64 and boot.isprintable()):
        raise DamagedRun(f"boot {str(boot)[:40]!r} is not a boot id")
    for name, v in (("reserved", reserved), ("last_seq", last)):
        if not (isinstance(v, int) and 0 <= v <= MAX_SEQ):
            raise DamagedRun(f"{name} {str(v)[:40]!r} is not a seq")
    return boot, str(kernel), reserved, last, bool(clean)


def _read_only(path: Path) -> sqlite3.Connection:
    """Read-only, and changing nothing beside the file: without a WAL of its own it is opened as
    immutable, else SQLite would create one and an index file next to it."""
    wal = Path(f"{path}-wal").exists()
    return sqlite3.connect(f"file:{path}?mode=ro{'' if wal else '&immutable=1'}", uri=True, isolation_level=None)


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "file is encrypted" in text or "corrupt" in text


# -- reading a damaged file ------------------------------------------------------------------

Row = tuple[int, str, str, bytes, int, float, float | None]  # the outbox's columns
MAX_ROWID = 2**63 - 1


def salvage(path: Path, kinds: Iterable[str]) -> tuple[list[Row], int, bool]:
    """The outbox rows SQLite can still read from a damaged file, in id order; how many it could
    not; and whether that count is exact.

    Read in id order, row by row. A row whose id reads but whose data does not (a broken
    overflow page) is one lost. A damaged b-tree page hides a stretch of ids: the next
    readable id is found by seeking further (doubling the step, then halving back), and the
    ids in between count as lost (exact when ids were consecutive, as a spool's mostly are).
    Damage before the first or after the last readable row is counted only when SQLite can
    still tell the lowest or highest id; otherwise the count is "at least".
    """
    kinds = set(kinds)
    try:
        db = _read_only(path)
    except sqlite3.Error:
        return [], 0, False
    rows: list[Row] = []
    lost, exact = 0, True
    try:
        if not _readable(db, "SELECT 1 FROM outbox LIMIT 0"):
            return [], 0, False
        # A file from before the spool kept ages has no stamps: its rows read with none.
        stamp = "stamp" if _readable(db, "SELECT stamp FROM outbox LIMIT 0") else "NULL"
        lo = _first_id(db, "SELECT MIN(id) FROM outbox")
        hi = _first_id(db, "SELECT MAX(id) FROM outbox")
        # Ids are >= 1; below the lowest id there is nothing to lose.
        cursor = 0 if lo is None else lo - 1
        for _ in range(1_000_000):  # bounded, however the file is damaged
            got, broke = _read_from(db, cursor, kinds, stamp)
            for row in got:
                if row[0] > cursor:
                    rows.append(row)
                    cursor = row[0]
            if not broke:
                break
            # Always seek with >= to the next id: a seek for "> cursor" starts at the cursor's own
            # page, which may be the damaged one even when the next id's page is not.
            nxt = _first_id(db, "SELECT id FROM outbox WHERE id >= ? ORDER BY id LIMIT 1", cursor + 1)
            if nxt is not None and nxt > cursor:
                # The id reads. Python's sqlite3 steps one row ahead, so the row that failed may be the
                # one after it: read this one alone. If its data does not read, it is one lost.
                one, _ = _read_from(db, nxt - 1, kinds, stamp, limit=1)
                if one and one[0][0] == nxt:
                    rows.append(one[0])
                else:
                    lost += 1
                cursor = nxt
                continue
            after = _next_readable(db, cursor)
            if after is None or after <= cursor:  # damaged up to the end
                if hi is not None and hi > cursor:
                    lost += hi - cursor
                else:
                    exact = False
                break
            if lo is None and not rows:
                exact = False  # the lowest id is unknown: how many the first stretch held is too
            else:
                lost += after - cursor - 1
            cursor = after - 1
    finally:
        db.close()
    return rows, lost, exact


def _readable(db: sqlite3.Connection, sql: str, *args: object) -> bool:
    try:
        db.execute(sql, args).fetchall()
    except sqlite3.Error:
        return False
    return True


def _first_id(db: sqlite3.Connection, sql: str, *args: object) -> int | None:
    try:
        row = db.execute(sql, args).fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) if row and isinstance(row[0], int) else None


def _read_from(
    db: sqlite3.Connection, cursor: int, kinds: set[str], stamp: str, limit: int = -1
) -> tuple[list[Row], bool]:
    """Rows after `cursor` up to the first that does not read; and whether one did not."""
    got: list[Row] = []
    try:
        for i, k, t, p, q, c, st in db.execute(
            f"SELECT id, kind, topic, payload, qos, created, {stamp} FROM outbox WHERE id >= ? ORDER BY id LIMIT ?",
            (cursor + 1, limit),
        ):
            if not (isinstance(i, int) and i > cursor and k in kinds and isinstance(t, str)
                    and isinstance(p, bytes) and q in (0, 1, 2) and isinstance(c, int | float)):
                # Garbage SQLite did not notice: treat it as the data of that row not reading.
                return got, True
            got.append((i, k, t, p, q, float(c), float(st) if isinstance(st, int | float) else None))
            cursor = i
    except sqlite3.Error:
        return got, True
    return got, False


def _next_readable(db: sqlite3.Connection, cursor: int) -> int | None:
    """The first id after a damaged stretch that starts right after `cursor`; None if it runs to the end.

    A seek to an id inside the stretch fails; one past it lands on the next good page, so
    success is monotone in the id sought, and the boundary can be searched for.
    """

    def seek(at: int) -> int | bool | None:  # the id found, None (no more rows), False (fails)
        try:
            row = db.execute("SELECT id FROM outbox WHERE id >= ? ORDER BY id LIMIT 1", (at,)).fetchone()
        except sqlite3.Error:
            return False
        return int(row[0]) if row else None

    bad, step = cursor + 1, 1
    while True:  # double the step until a seek works
        probe = min(cursor + 1 + step, MAX_ROWID)
        found = seek(probe)
        if found is not False:
            break
        bad = probe
        if probe == MAX_ROWID:
            return None
        step *= 2
    good = probe
    while good - bad > 1:  # halve back to the first seek that works
        mid = (bad + good) // 2
        f = seek(mid)
        if f is False:
            bad = mid
        else:
            good, found = mid, f
    return None if found is None or found is False else int(found)
