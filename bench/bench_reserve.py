"""Benchmark: what the spool's durable seq reservation costs, against none and against an fsync per result.

    .venv/bin/python bench/bench_reserve.py [--rounds N] [--block N] [--dir DIR]

Each block appends --block results of 800 bytes and deletes each one (as the sender does once the
broker acknowledges it). Variants, each on its own file in --dir (put it on the disk you mean: a
tmpfs makes every fsync free), interleaved block by block so that load from other processes hits
each alike:

  normal    Spool.append()/delete() without a run: no reservation, synchronous=NORMAL throughout
  reserved  the same after begin_run(): one commit in RESERVE_SEQS made durable (fsync of the WAL)
  full      synchronous=FULL on every commit: what a durable record of every result would cost

Prints the median microseconds per result of each and the ratios. The fsyncs each makes are counted
with `strace -f -c -e trace=fsync,fdatasync .venv/bin/python bench/bench_reserve.py --only VARIANT`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecam.device.spool import RESERVE_SEQS, Quota, Spool  # noqa: E402

PAYLOAD = b"x" * 800
VARIANTS = ("normal", "reserved", "full")


def make(tmp: Path, variant: str) -> Spool:
    quotas = {"result": Quota(10**12, 10**9), "overlay": Quota(10**12, 10**9)}
    s = Spool(tmp / f"{variant}.db", quotas)
    assert s.state == "file", s.reason
    if variant == "reserved":
        s.begin_run("bench")
    if variant == "full":
        assert s._db is not None
        s._db.execute("PRAGMA synchronous=FULL")  # every commit fsyncs the WAL
    return s


def block(s: Spool, n: int, seq: int) -> None:
    for k in range(n):
        got = s.append("result", "t", PAYLOAD, 1, seq + k)
        assert got is not None
        s.delete([got])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary directory)")
    ap.add_argument("--only", choices=VARIANTS, help="one variant alone (for counting its fsyncs under strace -c)")
    args = ap.parse_args()
    variants = (args.only,) if args.only else VARIANTS
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        spools = {v: make(Path(tmp), v) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        seq = 1
        for _ in range(args.rounds):
            for v, s in spools.items():
                t0 = time.perf_counter()
                block(s, args.block, seq)
                times[v].append((time.perf_counter() - t0) / args.block * 1e6)
            seq += args.block
        for s in spools.values():
            s.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rounds} rounds of {args.block} results of {len(PAYLOAD)} bytes, appended then deleted; "
          f"a reservation every {RESERVE_SEQS}")
    for k, v in med.items():
        print(f"{k:9s} median {v:8.1f} us per result")
    if "normal" in med:
        for k in med:
            if k != "normal":
                print(f"{k} / normal: {med[k] / med['normal']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
