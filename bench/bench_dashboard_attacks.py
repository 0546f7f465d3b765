"""Benchmark: what the attacks of issue 15 cost a running `edgecam dashboard`, with a real Mosquitto.

    .venv/bin/python bench/bench_dashboard_attacks.py [--rounds N] [--half-open N] [--body-mb N]

Per round, on a fresh dashboard: N half-open connections (a request line and one header, never
finished), the most threads the process had meanwhile, and how long until the server had closed
them all; then one POST with `Content-Length: -1` followed by a body of --body-mb MiB, how much
of it the server took before answering, and its peak RSS (VmHWM) before and after. Medians over
the rounds are printed.
"""

from __future__ import annotations

import argparse
import re
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker, free_port  # noqa: E402


def status_field(pid: int, name: str) -> int:
    return int(re.search(rf"{name}:\s*(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def half_open(port: int, pid: int, n: int) -> tuple[int, float]:
    """The most threads while n half-open connections are held, and seconds until all are closed."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.setblocking(False)
        socks.append(s)
    start, most, open_ = time.monotonic(), 0, set(socks)
    while open_ and time.monotonic() - start < 120:
        most = max(most, status_field(pid, "Threads"))
        for s in select.select(list(open_), [], [], 0.2)[0]:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                open_.discard(s)
    took = time.monotonic() - start if not open_ else float("inf")
    for s in socks:
        s.close()
    return most, took


def negative_length(port: int, pid: int, mib: int) -> tuple[int, int, int]:
    """MiB the server took of a body announced as -1 before answering; peak RSS before and after (KiB)."""
    before = status_field(pid, "VmHWM")
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /api/cmd HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: -1\r\n\r\n")
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(mib):
                if select.select([s], [], [], 0)[0]:
                    break  # answered
                s.sendall(chunk)
                sent += 1
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
        except OSError:
            pass
    return sent, before, status_field(pid, "VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--half-open", type=int, default=400)
    ap.add_argument("--body-mb", type=int, default=300)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {k: [] for k in ("threads", "closed_s", "idle_threads", "body_mib", "rss_before",
                                                    "rss_after")}
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "broker").start()
        try:
            for _ in range(args.rounds):
                port = free_port()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "edgecam", "dashboard", "--broker", broker.address,
                     "--listen", f"127.0.0.1:{port}", "--username", "dash"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
                try:
                    deadline = time.monotonic() + 60
                    while not serving(port):
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise SystemExit("the dashboard did not start")
                        time.sleep(0.2)
                    rows["idle_threads"].append(status_field(proc.pid, "Threads"))
                    most, took = half_open(port, proc.pid, args.half_open)
                    rows["threads"].append(most)
                    rows["closed_s"].append(took)
                    sent, before, after = negative_length(port, proc.pid, args.body_mb)
                    rows["body_mib"].append(sent)
                    rows["rss_before"].append(before / 1024)
                    rows["rss_after"].append(after / 1024)
                finally:
                    proc.terminate()
                    proc.wait(30)
        finally:
            broker.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"rounds {args.rounds}; medians")
    print(f"{args.half_open} half-open connections: threads {med['idle_threads']:.0f} idle -> {med['threads']:.0f} "
          f"at most; all closed by the server after {med['closed_s']:.1f} s")
    print(f"Content-Length -1 then {args.body_mb} MiB: {med['body_mib']:.0f} MiB sent before the answer; "
          f"peak RSS {med['rss_before']:.0f} -> {med['rss_after']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
