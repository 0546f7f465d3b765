"""Memory: a command imports what it needs, the classifier holds its model once and its weights as
stored, and the daemon's frames leave nothing behind (a Raspberry Pi Zero 2 W has 512 MB for all)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from broker import Broker
from conftest import DEFAULT_MODEL, IMAGES, LABELS, ROOT, wait_until

from edgecam.core.model import Classifier
from edgecam.device.capture import Capture
from edgecam.device.config import Config
from edgecam.device.daemon import Daemon
from edgecam.device.mqtt import MqttSink
from edgecam.device.run import make_spool
from edgecam.device.sources import FolderSource

RUNTIMES = {"ai_edge_litert", "tflite_runtime"}
OFFLINE = {"edgecam.core.layers", "edgecam.core.evaluate", "edgecam.core.methods.superpixels"}


# `edgecam ARGS` with the modules it imported written out at exit (sys.modules: -X importtime misses
# what importlib.import_module loads, which is how the method registry imports a method).
PROBE = """import atexit, os, runpy, sys
atexit.register(lambda: open(os.environ["EDGECAM_TEST_MODULES"], "w").write("\\n".join(sorted(sys.modules))))
sys.argv[0] = "edgecam"
runpy.run_module("edgecam", run_name="__main__")
"""


def libraries_import_numpy_ma() -> bool:
    """Whether OpenCV and the TFLite runtime, loaded alone, already import numpy.ma."""
    code = ("import sys, cv2; from edgecam.core.runtime import get_runtime; get_runtime(); "
            "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    return out.stdout.strip().endswith("True")


def imported(tmp_path: Path, *args: str,
             env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess]:
    """The modules `edgecam ARGS` had imported when it exited."""
    out = tmp_path / "modules.txt"
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, **(env or {}), "EDGECAM_TEST_MODULES": str(out)})
    return set(out.read_text().split()), proc


@pytest.mark.parametrize("args", [
    ["--version"], ["watch", "--help"], ["dashboard", "--help"],
    # The configuration is read and checked before OpenCV or the runtime is installed (they were
    # imported through the contract's PNG and preprocessing's normalisation).
    ["config", "reference"], ["config", "default"],
    ["config", "check", "--source", str(IMAGES), "--broker", "[::1]:1884", "--max-fps", "3", "--device-id", "d1"],
])
def test_a_command_that_needs_no_opencv_does_not_load_it(args: list[str], tmp_path: Path) -> None:
    # A config file stating what needed OpenCV to check: the input normalisation, the prefix.
    config = tmp_path / "edgecam.toml"
    config.write_text('[model]\ninput_mean = "127.5"\ninput_std = "127.5"\n[mqtt]\nprefix = "site"\n')
    names, proc = imported(tmp_path, *args, env={"EDGECAM_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr[-500:]
    assert "cv2" not in names and not OFFLINE & names
    if args != ["--version"]:  # which prints the runtime it loads
        assert not RUNTIMES & names
    # The methods' modules are imported when a method is made, and none is made here.
    assert not {n for n in names if n.startswith("edgecam.core.methods.")} - {"edgecam.core.methods.registry"}


def test_explain_help_lists_every_method_without_importing_one(tmp_path: Path) -> None:
    names, proc = imported(tmp_path, "explain", "--help")
    assert proc.returncode == 0, proc.stderr[-500:]
    for method in ("cam", "occlusion", "wide", "lime", "scorecam", "rise", "random"):
        assert f"{method}:" in proc.stdout
    made = {n for n in names if n.startswith("edgecam.core.methods.")}
    assert made <= {"edgecam.core.methods.registry", "edgecam.core.methods.base"}, made


@pytest.mark.model
def test_the_daemon_imports_the_cam_and_no_offline_method(broker: Broker, tmp_path: Path) -> None:
    names, proc = imported(tmp_path, "run", "--source", str(IMAGES), "--once", "--max-frames", "3", "--broker",
                           broker.address, "--device-id", "imports", "--model", str(DEFAULT_MODEL),
                           "--overlay-every", "1", env={"EDGECAM_SPOOL_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "stopped after 3 frames" in proc.stderr
    methods = {n for n in names if n.startswith("edgecam.core.methods.")}
    assert methods == {"edgecam.core.methods.base", "edgecam.core.methods.registry", "edgecam.core.methods.cam"}
    assert not OFFLINE & names
    # Older OpenCV (4.11, the bookworm shape) imports numpy.ma itself; edgecam must not add it.
    if not libraries_import_numpy_ma():
        assert "numpy.ma" not in names, "np.median/np.percentile import numpy.ma; the stats use statistics"
    assert not {n for n in names if n.startswith("edgecam.web") or n.startswith("edgecam.cli.")}


@pytest.mark.model
def test_the_classifier_holds_its_model_once_and_its_weights_as_stored() -> None:
    size = DEFAULT_MODEL.stat().st_size
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        clf = Classifier(DEFAULT_MODEL, LABELS)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One copy of the model (the one the interpreter runs, with two more outputs) and small things:
    # not a second copy (4 MB) nor the weights dequantized whole (1001 x 1280 float32, 5 MB).
    assert held < size + 1.5e6, f"the classifier holds {held / 1e6:.1f} MB for a {size / 1e6:.1f} MB model"
    assert len(clf.prepared) >= size
    # Rows come dequantized on demand, bit for bit the rows of the whole matrix.
    whole = np.asarray(clf.head.weights)
    assert whole.shape == (1001, 1280) and whole.dtype == np.float32
    rows = clf.head.weights[[286, 0, 286]]
    assert rows.dtype == np.float32 and np.array_equal(rows, whole[[286, 0, 286]])
    assert np.array_equal(clf.head.weights[5], whole[5])


FRAME_BYTES = 1 << 20  # a 720p frame is 2.6 MiB, its pictures and scaled copies at least 1 MiB


@pytest.mark.model
def test_frames_leave_no_garbage_behind(broker: Broker, tmp_path: Path) -> None:
    """Hundreds of 720p frames through the whole loop (a folder source, as `edgecam run --source DIR`
    has; CAM, overlay every 10th, spool, real broker): what Python holds afterwards is what it held
    before, give or take the frames in flight."""
    cfg = Config()
    cfg.device_id = "memory"
    cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker.port
    cfg.spool.dir = str(tmp_path / "state")
    cfg.loop.overlay_every = 10
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("cat_720p.jpg", "parrot.jpg", "bird.bmp"):  # BMP: decoding costs next to nothing, as a camera's
        frame = cv2.resize(cv2.imread(str(IMAGES / name)), (1280, 720), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"{Path(name).stem}.bmp"), frame)
    source = FolderSource(folder)
    source.open()
    d = Daemon(cfg, Classifier(DEFAULT_MODEL, LABELS), Capture(source), sink, "test")
    sink.start()
    try:
        assert wait_until(lambda: sink.connected, 20)
        d.frames(100)  # warm-up: caches, first imports, the spool's tables
        d.finisher.wait()
        d.publish_stats()
        tracemalloc.start()
        try:
            snaps = []
            for _ in range(3):
                d.frames(150)
                d.finisher.wait()
                d.publish_stats()
                assert wait_until(lambda: sink.spool.counts()["waiting"] == 0, 20)
                gc.collect()
                snaps.append(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
    finally:
        sink.close(5)
    assert d.seq == 550
    diff = snaps[-1].compare_to(snaps[0], "lineno")
    # One block of a frame's size more or less is a picture some thread still refers to until its next
    # frame replaces it (seen once in CI: 1.9 MB in a single block, on tflite-runtime), not a leak: a
    # leak grows by a block, or a block's size, every frame.
    in_flight = [s for s in diff if abs(s.count_diff) <= 1 and abs(s.size_diff) >= FRAME_BYTES]
    growth = sum(s.size_diff for s in diff if s not in in_flight)
    # A leak of 300 bytes a frame would be 90 KB over the last 300 frames.
    assert growth < 64_000, f"{growth} bytes more after 300 frames; biggest holders: {diff[:5]}"
