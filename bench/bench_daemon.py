"""Benchmark: the daemon's frame loop against a bare invoke(), with a real Mosquitto.

    .venv/bin/python bench/bench_daemon.py [--rounds N] [--block N] [--rss-frames N]

A 1280x720 source (the shared cat_720p.jpg and three other photos scaled to 720p,
held in memory as a camera's buffers would be). Three variants are measured side
by side, interleaved block by block so that load from other processes hits each
alike: bare set_tensor()+invoke(); the whole loop step (preprocess, invoke, top-3,
CAM, encode, publish at QoS 1 to Mosquitto) without overlays; the same with a
320x240 overlay JPEG every frame. Then `edgecam run` is started as a process for
--rss-frames frames from a folder of 720p images and its peak RSS is read.
Prints medians, ratios, fps and sizes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker  # noqa: E402

from edgecam.core.model import Classifier  # noqa: E402
from edgecam.core.preprocess import to_input  # noqa: E402
from edgecam.device.capture import Capture  # noqa: E402
from edgecam.device.config import Config  # noqa: E402
from edgecam.device.daemon import Daemon  # noqa: E402
from edgecam.device.mqtt import MqttSink  # noqa: E402
from edgecam.device.run import make_spool  # noqa: E402
from edgecam.device.sources import Frame  # noqa: E402

SHARED = ROOT.parent / "shared"
PHOTOS = ["cat_720p.jpg", "parrot.jpg", "bird.bmp", "hot_dog.jpg"]


class MemorySource:
    """Frames from memory, handed over in turn, as fast as the loop takes them."""

    live = False
    description = "memory 1280x720"

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = frames
        self.n = 0

    def open(self) -> None:
        pass

    def read(self) -> Frame:
        self.n += 1
        return Frame(self.frames[self.n % len(self.frames)], time.time(), time.monotonic())

    def close(self) -> None:
        pass


def make_daemon(cfg: Config, clf: Classifier, frames: list[np.ndarray], state: Path) -> Daemon:
    cfg.spool.dir = str(state)
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    d = Daemon(cfg, clf, Capture(MemorySource(frames)), sink, "bench")
    d.sink.start()
    deadline = time.monotonic() + 10
    while not d.sink.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return d


def peak_rss(frames_dir: Path, n: int, broker: Broker, env: dict[str, str]) -> tuple[float, float]:
    """`edgecam run` for n frames with an overlay every 10th: (peak RSS in MB, wall seconds)."""
    cmd = [sys.executable, "-m", "edgecam", "run", "--source", str(frames_dir), "--max-frames", str(n),
           "--broker", broker.address, "--device-id", "bench-rss", "--overlay-every", "10"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"edgecam run failed: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
    return usage.ru_maxrss / 1024.0, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models/tf2_mobilenet_v2_1.0_224_ptq.tflite")
    ap.add_argument("--labels", type=Path, default=SHARED / "models/imagenet_labels.txt")
    ap.add_argument("--rounds", type=int, default=30, help="blocks of each variant")
    ap.add_argument("--block", type=int, default=20, help="frames per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-frames", type=int, default=2000)
    args = ap.parse_args()

    frames = [cv2.resize(cv2.imread(str(SHARED / "images" / p)), (1280, 720), interpolation=cv2.INTER_AREA)
              for p in PHOTOS]
    clf = Classifier(args.model, args.labels, num_threads=args.threads, name=args.model.stem)
    tmp = Path(tempfile.mkdtemp(prefix="edgecam-bench-"))
    broker = Broker(tmp / "broker").start()
    try:
        plain_cfg, over_cfg = Config(), Config()
        for cfg, dev in ((plain_cfg, "bench-plain"), (over_cfg, "bench-overlay")):
            cfg.device_id = dev
            cfg.mqtt.port = broker.port
            cfg.mqtt.host = "127.0.0.1"
            cfg.model.threads = args.threads
        over_cfg.loop.overlay_every = 1  # 320x240 by default
        plain, over = make_daemon(plain_cfg, clf, frames, tmp), make_daemon(over_cfg, clf, frames, tmp)
        # For scale: the same loop on 640x480 frames, the size edgecam asks of a USB camera by default.
        vga_cfg = Config()
        vga_cfg.device_id, vga_cfg.mqtt.port, vga_cfg.mqtt.host = "bench-vga", broker.port, "127.0.0.1"
        small = [cv2.resize(f, (640, 480), interpolation=cv2.INTER_AREA) for f in frames]
        vga = make_daemon(vga_cfg, clf, small, tmp)

        x, _ = to_input(frames[0], clf.input)
        it, inp = clf.interpreter, clf._input_index
        times: dict[str, list[float]] = {
            "bare invoke()": [], "loop, no overlay": [], "loop, overlay 320x240": [], "(640x480 loop, no overlay)": []
        }

        def bare() -> None:
            it.set_tensor(inp, x)
            it.invoke()

        sizes: list[int] = []
        jpegs: list[int] = []

        def step(d: Daemon) -> None:
            frame = d.capture.take()
            assert frame is not None
            d.step(frame)
            # Sizes are read after the clock stops (see the loop below), from what was just sent.

        variants = {
            "bare invoke()": bare,
            "loop, no overlay": lambda: step(plain),
            "loop, overlay 320x240": lambda: step(over),
            "(640x480 loop, no overlay)": lambda: step(vga),
        }
        for fn in variants.values():  # warm-up
            for _ in range(10):
                fn()
        wall: dict[str, float] = dict.fromkeys(variants, 0.0)
        count: dict[str, int] = dict.fromkeys(variants, 0)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                block_start = time.perf_counter()
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    if name == "loop, overlay 320x240" and over.last_result and over.last_overlay:
                        sizes.append(len(over.last_result))
                        jpegs.append(len(over.last_overlay))
                wall[name] += time.perf_counter() - block_start
                count[name] += args.block
        for d in (plain, over, vga):
            d.sink.close(10)

        base = statistics.median(times["bare invoke()"])
        print(f"model {args.model.name}, runtime {clf.runtime}, {args.threads} threads, 1280x720 frames, "
              f"{args.rounds} x {args.block} frames per variant, interleaved")
        print(f"{'variant':28s} {'median ms':>10s} {'p90 ms':>8s} {'ratio':>6s} {'fps':>7s}")
        for name, values in times.items():
            med = statistics.median(values)
            p90 = float(np.percentile(values, 90))
            fps = count[name] / wall[name]
            print(f"{name:28s} {med:10.3f} {p90:8.3f} {med / base:6.2f} {fps:7.1f}")
        stages = plain.times.medians()
        print("1280x720 loop stage medians, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
        ostages = over.times.medians()
        print("with overlays, stage medians, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in ostages.items()))

        print(f"result payload bytes: median {statistics.median(sizes):.0f}, max {max(sizes)}")
        print(f"overlay JPEG bytes (320x240, quality 80): median {statistics.median(jpegs):.0f}, max {max(jpegs)}")

        folder = tmp / "frames"
        folder.mkdir()
        for name, f in zip(PHOTOS, frames, strict=True):
            cv2.imwrite(str(folder / (Path(name).stem + ".jpg")), f, [cv2.IMWRITE_JPEG_QUALITY, 92])
        env = {
            **os.environ,
            "EDGECAM_SPOOL_DIR": str(tmp / "state"),
            "EDGECAM_MODEL_NAME": str(args.model),
            "EDGECAM_MODEL_LABELS": str(args.labels),
        }
        rss, secs = peak_rss(folder, args.rss_frames, broker, env)
        print(f"edgecam run, {args.rss_frames} frames (720p JPEG folder, overlay every 10th): "
              f"peak RSS {rss:.0f} MB, {secs:.1f} s wall")
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
