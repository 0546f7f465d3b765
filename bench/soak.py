"""Soak benchmark: `edgecam run` for 20,000 frames with a broker restart in the middle.

    .venv/bin/python bench/soak.py [--frames 20000] [--outage 20] [--overlay-every 10]

The daemon runs as its own process on the shared images (every frame handed to the loop,
as fast as it goes) and publishes to a real Mosquitto started here. When the subscriber
has seen half the frames, the broker is stopped for --outage seconds and started again;
the daemon spools meanwhile and replays after. The subscriber keeps a persistent session
on a broker with persistence, so what the daemon sends while the subscriber reconnects
is kept for it. At the end it prints: results produced, delivered, duplicates, lost
(target 0), out of order, the peak RSS and its growth from frame 2,000 to the end
(target under 5 MB), and the spool file's peak size.

A script, not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker, Recorder  # noqa: E402

SHARED = ROOT.parent / "shared"
DEVICE = "soak"


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def spool_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob(f"spool-{DEVICE}.db*") if p.exists())


class Progress:
    """What the subscriber has seen: every (boot, seq) in arrival order."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def seqs(self) -> list[tuple[str, int]]:
        out = []
        for payload in self.rec.on("result"):
            r = json.loads(payload)
            out.append((r["boot"], r["seq"]))
        return out

    def count(self) -> int:
        return len(self.rec.messages)  # only results are subscribed; len() needs no lock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20_000)
    ap.add_argument("--outage", type=float, default=20.0, help="seconds the broker stays down")
    ap.add_argument("--overlay-every", type=int, default=10)
    ap.add_argument("--images", type=Path, default=SHARED / "images")
    ap.add_argument("--model", type=Path, default=SHARED / "models/tf2_mobilenet_v2_1.0_224_ptq.tflite")
    ap.add_argument("--labels", type=Path, default=SHARED / "models/imagenet_labels.txt")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgecam-soak-"))
    state = tmp / "state"
    # Unlimited queue for the subscriber's session: the broker's default (1,000) would drop
    # results the daemon replays while the subscriber is still reconnecting.
    broker = Broker(tmp / "broker", persist=True, extra_conf="max_queued_messages 0\n").start()
    rec = Recorder(broker.port, f"edgecam/{DEVICE}/result", client_id="soak-rec", persistent=True)
    progress = Progress(rec)
    env = {
        **os.environ,
        "EDGECAM_SPOOL_DIR": str(state),
        "EDGECAM_MODEL_NAME": str(args.model),
        "EDGECAM_MODEL_LABELS": str(args.labels),
        "EDGECAM_MQTT_RECONNECT_MIN": "1",
        "EDGECAM_MQTT_RECONNECT_MAX": "2",
    }
    cmd = [sys.executable, "-m", "edgecam", "run", "--source", str(args.images), "--max-frames", str(args.frames),
           "--broker", broker.address, "--device-id", DEVICE, "--overlay-every", str(args.overlay_every)]
    log = tmp / "daemon.log"
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=ROOT)

    samples: list[tuple[float, int, int]] = []  # seconds, results seen, RSS KiB
    spool_peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            kib = rss_kib(proc.pid)
            if kib is not None:
                samples.append((time.monotonic() - start, progress.count(), kib))
            spool_peak[0] = max(spool_peak[0], spool_bytes(state))
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outage_at = None
    try:
        while proc.poll() is None and progress.count() < args.frames // 2:
            time.sleep(0.05)
        if proc.poll() is None:
            outage_at = progress.count()
            broker.stop()
            print(f"broker stopped after {outage_at} results; down for {args.outage:g} s", flush=True)
            time.sleep(args.outage)
            broker.start()
            print("broker started again", flush=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        code = os.waitstatus_to_exitcode(status)
        # What is still on its way from the broker to the subscriber.
        rec.wait_for(lambda m: len(m) >= args.frames, 30)
        time.sleep(1)
    finally:
        done.set()
        sampler.join()
        rec.close()
        broker.stop()

    text = log.read_text(errors="replace")
    if code != 0:
        print(f"edgecam run exited {code}:\n{text[-2000:]}")
        return 1
    seen = progress.seqs()
    boots = {b for b, _ in seen}
    unique = set(seen)
    produced = args.frames  # publish = every: one result per frame
    first = []
    noted: set[tuple[str, int]] = set()
    for key in seen:
        if key not in noted:
            noted.add(key)
            first.append(key[1])
    lost = sorted(set(range(1, produced + 1)) - {s for _, s in unique})
    disorder = sum(1 for a, b in itertools.pairwise(first) if b < a)

    at_2000 = next((kib for _, n, kib in samples if n >= 2000), None)
    after = [kib for _, n, kib in samples if n >= 2000]
    print(f"\nmodel {args.model.name}, source {args.images} (every frame), overlay every {args.overlay_every}, "
          f"{args.frames} frames, broker down {args.outage:g} s after {outage_at} results; {wall:.0f} s wall "
          f"({args.frames / wall:.0f} fps)")
    print(f"results produced {produced}, delivered {len(unique)}, duplicates {len(seen) - len(unique)}, "
          f"lost {len(lost)}{' ' + str(lost[:10]) if lost else ''}, out of order {disorder}, boots {len(boots)}")
    if at_2000 is not None and after:
        print(f"RSS at result 2,000: {at_2000 / 1024:.1f} MB; highest after: {max(after) / 1024:.1f} MB "
              f"(growth {(max(after) - at_2000) / 1024:+.1f} MB); at the end {after[-1] / 1024:.1f} MB")
    print(f"peak RSS (getrusage) {usage.ru_maxrss / 1024:.1f} MB")
    print(f"spool file peak {spool_peak[0] / 1024:.0f} KiB (spool-{DEVICE}.db with its WAL)")
    for line in text.splitlines():
        if "lost the connection" in line or "connected to" in line or "spool" in line:
            print("  log: " + line[:160])
    return 0 if not lost else 1


if __name__ == "__main__":
    raise SystemExit(main())
