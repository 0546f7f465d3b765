"""Benchmark: the daemon's frame loop against a bare invoke(), with a real Mosquitto.

    .venv/bin/python bench/bench_daemon.py [--rounds N] [--block N] [--threads N] [--rss-frames N]

Sources hold frames in memory, as a camera's buffers would: 1280x720 (the shared cat_720p.jpg and
three other photos scaled to 720p), 640x480, and frames already at the model's input size (what
picamera2's low-resolution stream hands over). Variants are measured side by side, interleaved
block by block so that load from other processes hits each alike: bare set_tensor()+invoke(); the
loop (preprocess and invoke on the loop thread; top-3, CAM, encode and the spool hand-over on the
finisher thread, overlapped with the next invoke) without overlays, with a 320x240 overlay every
frame, and on the smaller frames.

Printed per variant: throughput in fps over whole blocks (the finisher drained at each block's
end) and its ratio to bare invoke()'s fps; the loop thread's time per frame; capture-to-hand-over
latency (from the source's read to the result being in the spool) p50 and p90, against bare
invoke()'s median and p90. Then two `edgecam run` processes at 5 fps give CPU time per frame
against a bare invoke() process at 5 fps (CPU of a longer run minus a shorter one, so start-up
cancels out), and one `edgecam run` of --rss-frames 720p frames gives peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
from edgecam.device.pipeline import interpreter_threads  # noqa: E402
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


class MemoryCamera(MemorySource):
    """Frames from memory at a camera's rate, read in the capture thread (newest wins)."""

    live = True
    description = "memory camera 1280x720 at 30 fps"

    def __init__(self, frames: list[np.ndarray], fps: float = 30.0) -> None:
        super().__init__(frames)
        self.period = 1.0 / fps
        self.next = time.monotonic()

    def read(self) -> Frame:
        self.next += self.period
        time.sleep(max(0.0, self.next - time.monotonic()))
        return super().read()


def make_daemon(cfg: Config, clf: Classifier, frames: list[np.ndarray], state: Path) -> Daemon:
    """A daemon with its broker connection up, driven block by block through Daemon.frames()."""
    cfg.spool.dir = str(state)
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    d = Daemon(cfg, clf, Capture(MemorySource(frames)), sink, "bench")
    d.sink.start()
    deadline = time.monotonic() + 10
    while not d.sink.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    return d


def peak_rss(frames_dir: Path, n: int, broker: Broker, env: dict[str, str]) -> tuple[float, float]:
    """`edgecam run` for n frames with an overlay every 10th: (peak RSS in MB, wall seconds).

    The peak is the process's own VmHWM, read while it runs: getrusage's ru_maxrss of a child
    also counts this (much larger) benchmark process as it was when it forked the child."""
    cmd = [sys.executable, "-m", "edgecam", "run", "--source", str(frames_dir), "--max-frames", str(n),
           "--broker", broker.address, "--device-id", "bench-rss", "--overlay-every", "10"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):  # gone between poll() and the read
            pass
        time.sleep(0.02)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"edgecam run failed: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
    return peak / 1024.0, wall


def child(kind: str, seconds: float, fps: float, port: int, state: Path, args: argparse.Namespace) -> int:
    """One process for the CPU measurement, printing its own CPU ms per frame (per second when idle)
    over a steady window after start-up: the whole daemon (a 30 fps camera-like source, the loop
    paced to `fps`, MQTT to the bench's broker), the daemon with a camera that delivers nothing, or
    a bare invoke() at `fps`."""
    frames = [cv2.resize(cv2.imread(str(SHARED / "images" / p)), (1280, 720), interpolation=cv2.INTER_AREA)
              for p in PHOTOS]
    clf = Classifier(args.model, args.labels, num_threads=args.threads, name=args.model.stem)
    warm = 3.0
    if kind == "bare":
        x, _ = to_input(frames[0], clf.input)
        nxt = start = time.monotonic()
        n, cpu0 = 0, 0.0
        while time.monotonic() < start + warm + seconds:
            nxt += 1 / fps
            clf.interpreter.set_tensor(clf._input_index, x)
            clf.interpreter.invoke()
            if not cpu0 and time.monotonic() >= start + warm:
                cpu0, n = time.process_time(), 0
            n += 1
            time.sleep(max(0.0, nxt - time.monotonic()))
        print((time.process_time() - cpu0) / max(n - 1, 1) * 1e3)
        return 0
    cfg = Config()
    cfg.device_id, cfg.mqtt.port, cfg.mqtt.host = "bench-cpu", port, "127.0.0.1"
    cfg.model.threads, cfg.loop.max_fps, cfg.spool.dir = args.threads, fps, str(state)
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    camera = MemoryCamera(frames, fps=1e-9 if kind == "idle" else 30.0)  # idle: a camera that delivers nothing
    d = Daemon(cfg, clf, Capture(camera), sink, "bench")
    mark: dict[str, float] = {}

    def measure() -> None:
        time.sleep(warm)
        mark["cpu"], mark["frames"] = time.process_time(), d.processed
        time.sleep(seconds)
        cpu, done = time.process_time() - mark["cpu"], d.processed - mark["frames"]
        print(cpu / seconds * 1e3 if kind == "idle" else cpu / max(done, 1) * 1e3, flush=True)
        d.stop.set()

    threading.Thread(target=measure, daemon=True).start()
    d.run(0)
    return 0


def cpu_per_frame(broker: Broker, state: Path, env: dict[str, str], args: argparse.Namespace,
                  fps: float = 5.0, seconds: float = 10.0) -> tuple[float, float, float]:
    """CPU ms per frame at `fps` of the daemon and of a bare invoke(), and the idle daemon's CPU ms per
    second, each measured by the process itself over `seconds` after 3 s of start-up."""
    def cpu(kind: str) -> float:
        out = subprocess.run([sys.executable, __file__, "--child", kind, str(seconds), str(fps), str(broker.port),
                              str(state), "--threads", str(args.threads), "--model", str(args.model),
                              "--labels", str(args.labels)], env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench child {kind} failed: {out.stderr[-500:]}")
        return float(out.stdout.split()[-1])

    return cpu("loop"), cpu("bare"), cpu("idle")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models/tf2_mobilenet_v2_1.0_224_ptq.tflite")
    ap.add_argument("--labels", type=Path, default=SHARED / "models/imagenet_labels.txt")
    ap.add_argument("--rounds", type=int, default=30, help="blocks of each variant")
    ap.add_argument("--block", type=int, default=20, help="frames per block")
    ap.add_argument("--threads", type=int, default=interpreter_threads(0),
                    help="interpreter threads, the same for every variant (default: the daemon's choice here)")
    ap.add_argument("--rss-frames", type=int, default=2000)
    ap.add_argument("--no-processes", action="store_true", help="skip the CPU and RSS runs of `edgecam run`")
    ap.add_argument("--child", nargs=5, metavar=("KIND", "SECONDS", "FPS", "PORT", "STATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, seconds, fps, port, state = args.child
        return child(kind, float(seconds), float(fps), int(port), Path(state), args)

    frames = [cv2.resize(cv2.imread(str(SHARED / "images" / p)), (1280, 720), interpolation=cv2.INTER_AREA)
              for p in PHOTOS]
    clf = Classifier(args.model, args.labels, num_threads=args.threads, name=args.model.stem)
    tmp = Path(tempfile.mkdtemp(prefix="edgecam-bench-"))
    broker = Broker(tmp / "broker").start()
    try:
        def daemon(dev: str, source: list[np.ndarray], overlay_every: int = 0) -> Daemon:
            cfg = Config()
            cfg.device_id, cfg.mqtt.port, cfg.mqtt.host = dev, broker.port, "127.0.0.1"
            cfg.model.threads = args.threads
            cfg.loop.overlay_every = overlay_every  # 320x240 by default
            return make_daemon(cfg, clf, source, tmp)

        vga = [cv2.resize(f, (640, 480), interpolation=cv2.INTER_AREA) for f in frames]
        native = [cv2.resize(f, (clf.input.width, clf.input.height), interpolation=cv2.INTER_AREA) for f in frames]
        daemons = {
            "loop 1280x720": daemon("bench-720p", frames),
            "loop 1280x720, overlay": daemon("bench-overlay", frames, 1),
            "loop 640x480": daemon("bench-vga", vga),
            f"loop {clf.input.width}x{clf.input.height} (lores)": daemon("bench-lores", native),
        }
        x, _ = to_input(frames[0], clf.input)
        it, inp = clf.interpreter, clf._input_index

        def bare() -> None:
            it.set_tensor(inp, x)
            it.invoke()

        variants: dict[str, Callable[[], None]] = {"bare invoke()": bare}
        variants.update({name: (lambda d=d: d.frames(args.block)) for name, d in daemons.items()})
        for name, fn in variants.items():  # warm-up
            fn()
            if name in daemons:
                daemons[name].finisher.wait()
        per_frame: list[float] = []
        latency: dict[str, list[float]] = {name: [] for name in daemons}
        wall = dict.fromkeys(variants, 0.0)
        count = dict.fromkeys(variants, 0)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                block_start = time.perf_counter()
                if name in daemons:
                    fn()
                    daemons[name].finisher.wait()
                else:
                    for _ in range(args.block):
                        t0 = time.perf_counter()
                        fn()
                        per_frame.append((time.perf_counter() - t0) * 1e3)
                wall[name] += time.perf_counter() - block_start
                count[name] += args.block
                if name in daemons:
                    latency[name] += list(daemons[name].times.times["handover"])[-args.block:]
        # The sink keeps the latest result and overlay (for Home Assistant's birth message).
        shown = daemons["loop 1280x720, overlay"].sink
        assert isinstance(shown, MqttSink)
        sizes = [len(shown._last_result or b"")]
        jpegs = [len(shown._last_overlay or b"")]
        for d in daemons.values():
            d.sink.close(10)

        base = statistics.median(per_frame)
        base90 = float(np.percentile(per_frame, 90))
        base_fps = count["bare invoke()"] / wall["bare invoke()"]
        print(f"model {args.model.name}, runtime {clf.runtime}, {args.threads} interpreter threads, "
              f"{os.cpu_count()} cores, {args.rounds} x {args.block} frames per variant, interleaved")
        print(f"{'variant':32s} {'fps':>7s} {'x bare':>7s} {'ms/frame':>8s} {'lat p50':>8s} {'x bare':>7s} "
              f"{'lat p90':>8s} {'x p90':>6s}")
        for name in variants:
            fps = count[name] / wall[name]
            loop_ms = wall[name] / count[name] * 1e3
            if name in latency:
                p50, p90 = statistics.median(latency[name]), float(np.percentile(latency[name], 90))
            else:
                p50, p90 = base, base90
            print(f"{name:32s} {fps:7.1f} {fps / base_fps:7.2f} {loop_ms:8.3f} {p50:8.3f} {p50 / base:7.2f} "
                  f"{p90:8.3f} {p90 / base90:6.2f}")
        for name, d in daemons.items():
            print(f"{name} stage medians, ms: " + ", ".join(f"{k} {v:.3f}" for k, v in d.times.medians().items()))
        print(f"result payload bytes: {sizes[0]}; overlay JPEG bytes (320x240, quality 80): {jpegs[0]}")

        if args.no_processes:
            return 0
        folder = tmp / "frames"
        folder.mkdir()
        for name, f in zip(PHOTOS, frames, strict=True):
            # BMP: decoding costs next to nothing, as with a camera's raw buffers.
            cv2.imwrite(str(folder / (Path(name).stem + ".bmp")), f)
        env = {
            **os.environ,
            "EDGECAM_SPOOL_DIR": str(tmp / "state"),
            "EDGECAM_MODEL_NAME": str(args.model),
            "EDGECAM_MODEL_LABELS": str(args.labels),
        }
        loop_cpu, bare_cpu, idle = cpu_per_frame(broker, tmp / "cpu-state", env, args)
        print(f"CPU per frame at 5 fps, 1280x720 camera-like source at 30 fps: daemon {loop_cpu:.2f} ms, "
              f"bare invoke() {bare_cpu:.2f} ms ({loop_cpu / bare_cpu:.2f}x); idle daemon (no frames) "
              f"{idle:.2f} ms CPU per second")
        rss, secs = peak_rss(folder, args.rss_frames, broker, env)
        print(f"edgecam run, {args.rss_frames} frames (720p folder, overlay every 10th): "
              f"peak RSS {rss:.0f} MB, {secs:.1f} s wall")
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
