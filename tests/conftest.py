"""Shared fixtures: the real models and images in ../shared, and a CLI runner."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGECAM_SHARED", ROOT.parent / "shared")).resolve()
MODELS = SHARED / "models"
IMAGES = SHARED / "images"
LABELS = MODELS / "imagenet_labels.txt"
DEFAULT_MODEL = MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite"
ALL_MODELS = [
    "tf2_mobilenet_v2_1.0_224_ptq",
    "mobilenet_v2_1.0_224_quant",
    "mobilenet_v1_0.25_128_quant",
]

# Top-1 labels from ../shared/models/README.md (first synonym), per model and image.
EXPECTED = {
    "tf2_mobilenet_v2_1.0_224_ptq": {
        "bird.bmp": ("chickadee", 0.86),
        "cat.bmp": ("Egyptian cat", 0.59),
        "cat_720p.jpg": ("Egyptian cat", 0.60),
        "dragonfly.bmp": ("dragonfly", 0.92),
        "grace_hopper.bmp": ("military uniform", 0.87),
        "hot_dog.jpg": ("hotdog", 0.62),
        "parrot.jpg": ("macaw", 0.92),
        "sunflower.bmp": ("daisy", 0.93),
    },
    "mobilenet_v2_1.0_224_quant": {
        "bird.bmp": ("chickadee", 0.99),
        "cat.bmp": ("Egyptian cat", 0.78),
        "cat_720p.jpg": ("Egyptian cat", 0.84),
        "dragonfly.bmp": ("dragonfly", 0.99),
        "grace_hopper.bmp": ("military uniform", 0.93),
        "hot_dog.jpg": ("hotdog", 0.92),
        "parrot.jpg": ("macaw", 1.00),
        "sunflower.bmp": ("daisy", 0.99),
    },
    "mobilenet_v1_0.25_128_quant": {
        "bird.bmp": ("chickadee", 0.51),
        "cat.bmp": ("Egyptian cat", 0.21),
        "cat_720p.jpg": ("Egyptian cat", 0.21),
        "dragonfly.bmp": ("tiger beetle", 0.19),
        "grace_hopper.bmp": ("academic gown", 0.27),
        "parrot.jpg": ("macaw", 0.80),
        "sunflower.bmp": ("daisy", 0.50),
        # hot_dog.jpg is a near tie on this model (README): not asserted.
    },
}
# ../shared/models/README.md allows 0.05 between set-ups. Measured here with tflite-runtime 2.14
# (its own kernels, not XNNPACK) and exact INTER_AREA: mobilenet_v2_1.0_224_quant on cat_720p.jpg
# scores 0.77 against the README's 0.84, and mobilenet_v1_0.25 on sunflower.bmp 0.55 against 0.50,
# with identical decoded and resized pixels; the labels agree. So that runtime gets 0.08.
SCORE_TOLERANCE = 0.08 if os.environ.get("EDGECAM_RUNTIME") == "tflite" else 0.05


def pytest_configure(config: pytest.Config) -> None:
    if not MODELS.is_dir():
        raise pytest.UsageError(f"{MODELS} is missing: the tests need ../shared beside the project")
    # No test may read or fill the user's own spool (~/.local/state/edgecam); tests that care set their own.
    os.environ["EDGECAM_SPOOL_DIR"] = tempfile.mkdtemp(prefix="edgecam-test-state-")


@functools.cache
def _own_namespaces() -> bool:
    """Whether this user may make a user and mount namespace of its own (and so mount a tmpfs there)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                          capture_output=True).returncode == 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """A test marked `mounts`, for a user who cannot mount: run it again in a user and mount namespace
    of its own, where it can (tests/smallfs.py), and report that run's outcome as its own."""
    if item.get_closest_marker("mounts") is None or os.geteuid() == 0 or not _own_namespaces():
        return None  # as root it mounts directly; with no namespaces it skips loudly
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    base = Path(tempfile.mkdtemp(prefix="edgecam-userns-"))
    start = time.monotonic()
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-m", "pytest", "-q", "-rs",
         "-p", "no:cacheprovider", "--basetemp", str(base / "tmp"), item.nodeid],
        capture_output=True, text=True, cwd=ROOT,
    )
    shutil.rmtree(base, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    longrepr: object = None
    if proc.returncode == 0 and " passed" in summary:
        outcome = "passed"
    elif proc.returncode == 0 and " skipped" in summary:
        outcome = "skipped"
        reason = next((line for line in lines if line.startswith("SKIPPED")), summary)
        longrepr = (str(item.path), item.location[1] or 0, f"in a user namespace: {reason}")
    else:
        outcome, longrepr = "failed", f"run again in a user namespace (unshare):\n{proc.stdout}\n{proc.stderr}"
    for when in ("setup", "call", "teardown"):
        report = pytest.TestReport(
            item.nodeid, item.location, dict.fromkeys(item.keywords, 1),
            outcome if when == "call" else "passed", longrepr if when == "call" else None, when,
            duration=time.monotonic() - start if when == "call" else 0.0,
        )
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache and the shared models as the mirror, for this test and its subprocesses."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGECAM_MODEL_DIR", str(cache))
    monkeypatch.setenv("EDGECAM_MODEL_MIRROR", str(MODELS))
    return cache


def run_cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`edgecam ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgecam", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def wait_until(pred: Callable[[], object], timeout: float = 20.0, step: float = 0.002) -> bool:
    """Poll until pred() is true or the time is up (then one last look)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """stderr is exactly one `edgecam: error: ...` line containing every needle, with no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("edgecam: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real Mosquitto on a free loopback port, stopped after the test."""
    from broker import Broker

    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


class Daemon:
    """`edgecam run ARGS` as a background process, its log in a file."""

    def __init__(self, log: Path, *args: str | Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgecam", "run", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemons(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start daemons with `daemons(*args)`; any still running are killed after the test."""
    started: list[Daemon] = []

    def start(*args: str | Path, env: dict[str, str] | None = None) -> Daemon:
        # Each test keeps its spool files to itself, unless it names a directory.
        env = {"EDGECAM_SPOOL_DIR": str(tmp_path / "state"), **(env or {})}
        d = Daemon(tmp_path / f"daemon{len(started)}.log", *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()
