"""Benchmark: the spool's hand-over of one result against SQLite's own insert, side by side.

    .venv/bin/python bench/bench_spool.py [--rounds N] [--block N] [--dir DIR]

Each block appends --block results of 800 bytes (a typical result) and deletes each one, as
the sender does once the broker acknowledges it. Variants, interleaved block by block so that
load from other processes hits each alike, each on its own file in --dir:

  sqlite   a bare autocommit INSERT and DELETE on a WAL file with the spool's pragmas
  spool    Spool.append() and Spool.delete(): quotas, the disk-room check, the held-message path
           (every message passes through it on its way to the file) and the clocks

Prints the median microseconds per result of each, and the ratio.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecam.device.spool import SCHEMA, Quota, Spool  # noqa: E402

PAYLOAD = b"x" * 800


def bare(db: sqlite3.Connection, n: int, start: int) -> None:
    for i in range(start, start + n):
        db.execute("INSERT INTO outbox (id, kind, topic, payload, qos, created, stamp) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (i, "result", "t", PAYLOAD, 1, time.time(), 0.0))
        db.execute("DELETE FROM outbox WHERE id = ?", (i,))


def spooled(s: Spool, n: int) -> None:
    for _ in range(n):
        got = s.append("result", "t", PAYLOAD, 1)
        assert got is not None
        s.delete([got])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        quotas = {"result": Quota(10**12, 10**9), "overlay": Quota(10**12, 10**9)}
        s = Spool(Path(tmp) / "spool.db", quotas)
        assert s.state == "file", s.reason
        db = sqlite3.connect(str(Path(tmp) / "bare.db"), isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"wal_autocheckpoint={s.wal_pages}",
                       "secure_delete=OFF", "cache_size=-256"):
            db.execute(f"PRAGMA {pragma}")
        db.executescript(SCHEMA)
        times: dict[str, list[float]] = {"sqlite": [], "spool": []}
        next_id = 1
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            bare(db, args.block, next_id)
            t1 = time.perf_counter()
            spooled(s, args.block)
            t2 = time.perf_counter()
            next_id += args.block
            times["sqlite"].append((t1 - t0) / args.block * 1e6)
            times["spool"].append((t2 - t1) / args.block * 1e6)
        s.close()
        db.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rounds} rounds of {args.block} results of {len(PAYLOAD)} bytes, appended then deleted")
    for k, v in med.items():
        print(f"{k:7s} median {v:7.1f} us per result")
    print(f"spool / sqlite: {med['spool'] / med['sqlite']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
