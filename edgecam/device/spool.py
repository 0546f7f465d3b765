"""The durable outbox: every result waits here, in order, until the broker acknowledges it.

SQLite in WAL mode, one row per message with an id that only grows, so messages
leave in the order they were made, across broker outages and process restarts.
Bounded by size and age; when full, the configured policy drops the oldest or the
newest, and counts what it dropped.

When the file cannot be used (disk full, unwritable, corrupt), messages are held in
memory instead, up to a count, and written to the file as soon as it works again;
a corrupt file found at start-up is moved aside, never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgecam")

# Room the spool leaves free on its filesystem: 5% of it, within these bounds. Deleting
# delivered messages needs room in the WAL, and the rest of the system needs some too.
RESERVE_MIN = 1024 * 1024
RESERVE_MAX = 16 * 1024 * 1024
WAL_PAGES = 128
CACHE_KIB = 256  # SQLite page cache, in KiB

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Message:
    id: int
    kind: str  # "result" or "overlay": each kind has its own quota
    topic: str
    payload: bytes
    qos: int
    created: float  # wall-clock seconds


@dataclass
class Quota:
    max_bytes: int
    max_age: float  # seconds
    policy: str = "drop_oldest"  # or drop_newest


class Spool:
    """Thread-safe. One writer (the loop) and one reader (the sender) are the expected users."""

    def __init__(self, path: Path | None, quotas: dict[str, Quota], memory_limit: int = 1000) -> None:
        self.path = path
        self.quotas = quotas
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._mem: deque[Message] = deque()  # held while the file cannot take them; always newest
        # Acknowledged ids whose DELETE failed (a full disk refuses even that: WAL needs room).
        # They count as gone and are skipped; the DELETE is tried again before the next writes.
        self._tombstones: set[int] = set()
        self._bytes: dict[str, int] = dict.fromkeys(quotas, 0)
        self._count: dict[str, int] = dict.fromkeys(quotas, 0)
        self.dropped: dict[str, int] = dict.fromkeys(quotas, 0)
        self.state = "memory"  # "file" or "memory"
        self.reason = "no spool file configured" if path is None else ""
        self._next_id = 1
        self._retry_at = 0.0
        self.reserve = 0  # bytes left free on the spool's filesystem, set on first use
        self.waiting_at_start = 0
        self._expired_at = 0.0  # when after() last expired every kind
        if path is not None:
            self._open(path)

    # -- set-up -------------------------------------------------------------------------
    def _open(self, path: Path) -> None:
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
                try:
                    db = self._connect(path)
                except (sqlite3.Error, OSError) as exc2:
                    self._memory_only(f"cannot create {path}: {exc2}")
                    return
            else:
                self._memory_only(f"cannot open {path}: {exc}")
                return
        except OSError as exc:
            self._memory_only(f"cannot open {path}: {exc.strerror or exc}")
            return
        self._db = db
        self.state, self.reason = "file", ""
        for kind, n, size, top in db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MAX(id) FROM outbox GROUP BY kind"
        ):
            if kind in self._count:
                self._count[kind], self._bytes[kind] = int(n), int(size)
            self._next_id = max(self._next_id, int(top) + 1)
        self.waiting_at_start = sum(self._count.values())

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed message survives the process being killed;
            # a power cut may lose the last moments. FULL would fsync every frame.
            db.execute("PRAGMA synchronous=NORMAL")
            # Small WAL, folded back often and cut back after: a checkpoint can grow the file by
            # the WAL's size at once, which the reserve has to cover.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
            # Zeroing freed pages (on in some builds) makes a delete write as much as it frees.
            db.execute("PRAGMA secure_delete=OFF")
            # The outbox is written and read in order, so a small page cache does (SQLite's default
            # is 2 MB): a long outage should not show up as resident memory on a 512 MB Zero 2 W.
            db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            db.executescript(SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed (quick_check)")
        except BaseException:
            db.close()
            raise
        return db

    def _memory_only(self, reason: str) -> None:
        self._db = None
        self.state, self.reason = "memory", reason
        log.error("spool: %s; messages are held in memory only (up to %d) until it works", reason, self.memory_limit)
        self._retry_at = time.monotonic() + 30

    # -- the writer ---------------------------------------------------------------------
    def append(self, kind: str, topic: str, payload: bytes, qos: int, created: float | None = None) -> int | None:
        """Store one message; returns its id, or None when the quota's policy dropped it."""
        created = time.time() if created is None else created
        with self._lock:
            quota = self.quotas[kind]
            if len(payload) > quota.max_bytes:
                self.dropped[kind] += 1
                return None
            self._expire(kind, created)
            while self._bytes[kind] + len(payload) > quota.max_bytes and self._count[kind]:
                if quota.policy == "drop_newest":
                    self.dropped[kind] += 1
                    return None
                self._drop_oldest(kind)
            msg = Message(self._next_id, kind, topic, payload, qos, created)
            self._next_id += 1
            self._flush_memory()
            if self._db is not None and not self._mem and not self._room_for(len(payload)):
                reason = f"disk nearly full, keeping {self.reserve // 1024} KiB free"
                self._write_failed(sqlite3.OperationalError(reason))
                self._mem.append(msg)
            elif self._db is not None and not self._mem:
                try:
                    self._db.execute(
                        "INSERT INTO outbox (id, kind, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?, ?)",
                        (msg.id, kind, topic, payload, qos, created),
                    )
                except sqlite3.Error as exc:
                    self._write_failed(exc)
                    self._mem.append(msg)
            else:
                self._mem.append(msg)
            self._count[kind] += 1
            self._bytes[kind] += len(payload)
            while len(self._mem) > self.memory_limit:
                old = self._mem.popleft()
                self._forget(old.kind, len(old.payload))
                self.dropped[old.kind] += 1
            return msg.id

    def _room_for(self, size: int) -> bool:
        """Whether writing `size` bytes still leaves the reserve free.

        The spool must never take the last bytes of the disk: on a full disk SQLite cannot
        even delete (the WAL needs room), so acknowledged messages could never make space.
        Pages SQLite freed itself count as room.
        """
        assert self.path is not None and self._db is not None
        try:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
            if not self.reserve:
                self.reserve = max(RESERVE_MIN, min(RESERVE_MAX, st.f_blocks * st.f_frsize // 20))
            pages, page_size = (self._db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("freelist_count", "page_size"))
        except (OSError, sqlite3.Error):
            return True  # no figure: let the write itself tell
        wal = Path(str(self.path) + "-wal")
        pending = wal.stat().st_size if wal.exists() else 0  # what a checkpoint may add to the file
        return free + pages * page_size - pending - 2 * size >= self.reserve

    def _write_failed(self, exc: sqlite3.Error) -> None:
        log.error("spool: cannot write to %s (%s); holding messages in memory until it can", self.path, exc)
        self.state, self.reason = "memory", f"cannot write: {exc}"
        self._retry_at = time.monotonic() + 5

    def _flush_memory(self) -> None:
        """Move held messages into the file, oldest first, once it takes writes again."""
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
        if self._tombstones and not self._retry_deletes():
            self._retry_at = time.monotonic() + 5
            return
        if not self._mem:
            return
        if not self._room_for(sum(len(m.payload) for m in self._mem)):
            self._retry_at = time.monotonic() + 5
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO outbox (id, kind, topic, payload, qos, created) VALUES (?, ?, ?, ?, ?, ?)",
                [(m.id, m.kind, m.topic, m.payload, m.qos, m.created) for m in self._mem],
            )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            self._retry_at = time.monotonic() + 5
            return
        log.info("spool: writing to %s again (%d held messages saved)", self.path, len(self._mem))
        self._mem.clear()
        self.state, self.reason = "file", ""

    def _retry_deletes(self) -> bool:
        """Delete the acknowledged rows a full disk kept; frees pages for the held messages."""
        assert self._db is not None
        with contextlib.suppress(sqlite3.Error):
            # Folding the WAL back into the file and truncating it is what frees room on a full disk.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        ids = tuple(self._tombstones)
        try:
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)
        except sqlite3.Error:
            return False
        self._tombstones.clear()
        return True

    def _rollback(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def _oldest(self, kind: str) -> Message | None:
        if self._db is not None:
            try:
                rows = self._db.execute(
                    "SELECT id, kind, topic, payload, qos, created FROM outbox WHERE kind = ? ORDER BY id LIMIT ?",
                    (kind, 1 + len(self._tombstones)),
                ).fetchall()
            except sqlite3.Error:
                rows = []
            for row in rows:
                if row[0] not in self._tombstones:
                    return Message(*row)
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
            if old is None or old.created >= cutoff:
                return
            self._delete_locked([old.id])
            self.dropped[kind] += 1

    # -- the sender ---------------------------------------------------------------------
    def after(self, cursor: int, limit: int) -> list[Message]:
        """Up to `limit` messages with id > cursor, oldest first; none past its kind's age."""
        with self._lock:
            # Appends expire only their own kind; a kind that stopped coming is expired here,
            # once a second at most (the sender reads after every result).
            now = time.time()
            if abs(now - self._expired_at) >= 1.0:
                self._expired_at = now
                for kind in self.quotas:
                    self._expire(kind, now)
            rows: list[Message] = []
            if self._db is not None:
                try:
                    rows = [
                        Message(*r)
                        for r in self._db.execute(
                            "SELECT id, kind, topic, payload, qos, created FROM outbox"
                            " WHERE id > ? ORDER BY id LIMIT ?",
                            (cursor, limit + len(self._tombstones)),
                        )
                    ]
                    rows = [m for m in rows if m.id not in self._tombstones][:limit]
                except sqlite3.Error as exc:
                    log.error("spool: cannot read %s (%s)", self.path, exc)
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
            try:
                sizes = self._db.execute(
                    f"SELECT id, kind, LENGTH(payload) FROM outbox WHERE id IN ({marks})", tuple(wanted)
                ).fetchall()
            except sqlite3.Error as exc:
                log.error("spool: cannot read %s (%s)", self.path, exc)
                sizes = []
            try:
                self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", tuple(wanted))
            except sqlite3.Error as exc:
                if not self._tombstones:
                    log.error("spool: cannot delete delivered messages from %s (%s); trying again later",
                              self.path, exc)
                self._tombstones.update(i for i, _, _ in sizes)
                self._retry_at = max(self._retry_at, time.monotonic() + 5)
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

    # -- status -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": sum(self._count.values()),
                "bytes": sum(self._bytes.values()),
                "in_memory": len(self._mem),
                **{f"dropped_{k}s": v for k, v in self.dropped.items()},
            }

    def close(self) -> None:
        with self._lock:
            self._flush_memory()
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
                self._db = None


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "file is encrypted" in text or "corrupt" in text
