"""Chooses the TFLite interpreter: ai-edge-litert, or tflite-runtime.

ai-edge-litert is the maintained successor and is preferred; tflite-runtime
2.14 is the last release for CPython <= 3.11 and only works with NumPy 1.x.
`EDGECAM_RUNTIME=litert|tflite` forces one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from edgecam.core.errors import EdgecamError

_CANDIDATES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite": ("tflite_runtime.interpreter", "tflite-runtime"),
}


@dataclass(frozen=True)
class Runtime:
    key: str
    package: str
    version: str
    interpreter_cls: Any

    def __str__(self) -> str:
        return f"{self.package} {self.version}"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _load(key: str) -> Runtime:
    module_name, package = _CANDIDATES[key]
    module = importlib.import_module(module_name)
    return Runtime(key, package, _version(package), module.Interpreter)


_cached: Runtime | None = None


def get_runtime() -> Runtime:
    """The interpreter runtime in use (imported once per process)."""
    global _cached
    if _cached is not None:
        return _cached
    forced = os.environ.get("EDGECAM_RUNTIME", "").strip().lower()
    if forced and forced not in _CANDIDATES:
        raise EdgecamError(f"EDGECAM_RUNTIME={forced!r} is not one of: {', '.join(_CANDIDATES)}")
    order = [forced] if forced else list(_CANDIDATES)
    problems = []
    for key in order:
        try:
            _cached = _load(key)
            return _cached
        except ImportError as exc:
            # tflite-runtime 2.14 under NumPy 2 fails here with "_ARRAY_API not found".
            problems.append(f"{_CANDIDATES[key][1]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        except AttributeError as exc:
            problems.append(f"{_CANDIDATES[key][1]}: {exc}")
    raise EdgecamError(
        "no usable TFLite runtime (" + "; ".join(problems) + "); install ai-edge-litert, or tflite-runtime with numpy<2"
    )


def make_interpreter(model: bytes, num_threads: int) -> Any:
    runtime = get_runtime()
    with _quiet_info_logs():
        interpreter = runtime.interpreter_cls(model_content=model, num_threads=num_threads)
        # Delegates (XNNPACK) are applied here, which is where the runtime logs.
        interpreter.allocate_tensors()
    return interpreter


@contextlib.contextmanager
def _quiet_info_logs() -> Iterator[None]:
    """Drops the native runtime's INFO lines ("Created TensorFlow Lite XNNPACK delegate")
    from stderr while keeping its warnings and errors: field logs should carry signal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines():
                if line.strip() and not line.startswith("INFO:"):
                    print(line, file=sys.stderr)
