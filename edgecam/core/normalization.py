"""A model's input normalisation: what real value each pixel (0..255) stands for.

Apart from the rest of preprocessing (core/preprocess.py, which needs OpenCV) so that the
configuration, which states a normalisation, can be read and checked without OpenCV: `edgecam
config` runs on a machine where it is not installed yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgecam.core.errors import EdgecamError


@dataclass(frozen=True)
class Normalization:
    """The model's real input value for a pixel p (0..255) of channel c: (p - mean[c]) / std[c].

    One value applies to every channel. `source` says who stated it: flag, config, manifest,
    metadata, quantization (raw pixels, what a quantized input's own scale implies) or default.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "default"

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return np.broadcast_to(mean, (channels,)), np.broadcast_to(std, (channels,))

    def text(self) -> str:
        def nums(v: tuple[float, ...]) -> str:
            s = ", ".join(f"{x:g}" for x in v)
            return s if len(v) == 1 else f"[{s}]"

        return f"(pixel - {nums(self.mean)}) / {nums(self.std)}"


DEFAULT_NORMALIZATION = Normalization((127.5,), (127.5,), "default")


def parse_channels(value: object, what: str) -> tuple[float, ...]:
    """One number, or one per channel: 127.5, "127.5", "123.7,116.3,103.5" or a list of numbers."""
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        out = tuple(float(p) for p in parts if not isinstance(p, bool))
    except (TypeError, ValueError):
        raise EdgecamError(f"{what}: {value!r} is not a number or a comma-separated list of numbers") from None
    if not out or len(out) != len(parts) or len(out) > 4:
        raise EdgecamError(f"{what}: {value!r}: give one number, or one per channel")
    if not all(math.isfinite(v) for v in out):
        raise EdgecamError(f"{what}: {value!r}: numbers must be finite")
    return out


def normalization(mean: object, std: object, source: str, where: str = "") -> Normalization:
    """A stated normalisation, checked: both given, std above zero, in pixel units."""
    pre = f"{where}: " if where else ""
    if (mean is None) != (std is None):
        raise EdgecamError(f"{pre}input mean and input std go together (give both)")
    m = parse_channels(mean, f"{pre}input mean")
    s = parse_channels(std, f"{pre}input std")
    if any(v <= 0 for v in s):
        raise EdgecamError(f"{pre}input std {std!r}: must be above zero")
    if len(m) != len(s) and 1 not in (len(m), len(s)):
        raise EdgecamError(f"{pre}input mean has {len(m)} values and input std {len(s)}: give one or one per channel")
    return Normalization(m, s, source)
