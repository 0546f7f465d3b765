"""Occlusion sensitivity: slide a grey patch over the model's input and map how much each class
score drops. A second opinion that needs no gradients and nothing of the architecture.

Each pixel gets the mean score drop of the patches that covered it; the map is then averaged onto
the same grid as the model's CAM (7x7 for MobileNetV2), so the two line up cell for cell. Score
units: positive where hiding that part of the picture lowers the class's score.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edgecam.core.errors import EdgecamError
from edgecam.core.methods.base import Maps, Method, Scorer, grey
from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import InputSpec

log = logging.getLogger(__name__)


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one side, the last one flush with the edge so every pixel is covered."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occluded_inputs(x: np.ndarray, spec: InputSpec, patch: int, stride: int) -> tuple[np.ndarray, int, int]:
    """Every occluded copy of x [1, H, W, C], as [rows * cols, H, W, C], and the grid's shape."""
    _, h, w, _ = x.shape
    ys, xs = positions(h, patch, stride), positions(w, patch, stride)
    batch = np.repeat(x, len(ys) * len(xs), axis=0)
    fill = np.asarray(grey(spec)).astype(x.dtype)
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            batch[i * len(xs) + j, y : y + patch, x0 : x0 + patch] = fill
    return batch, len(ys), len(xs)


def pixel_map(drops: np.ndarray, height: int, width: int, patch: int, stride: int) -> np.ndarray:
    """Per pixel, the mean drop of the patches covering it; drops is [rows, cols] over patch positions."""
    ys, xs = positions(height, patch, stride), positions(width, patch, stride)
    total = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for i, y in enumerate(ys):
        for j, x0 in enumerate(xs):
            total[y : y + patch, x0 : x0 + patch] += drops[i, j]
            count[y : y + patch, x0 : x0 + patch] += 1
    return total / np.maximum(count, 1)


@dataclass
class Occlusion(Method):
    """Score drops under a grey patch at each position, averaged onto the CAM's grid."""

    name = "occlusion"
    patch: int = 56  # side, in model input pixels
    stride: int = 28

    def __post_init__(self) -> None:
        if self.patch < 1 or self.stride < 1:
            raise EdgecamError(f"--patch {self.patch} --stride {self.stride}: both must be at least 1 pixel")

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        start = time.perf_counter()
        base = inference.scores[classes]
        batch, rows, cols = occluded_inputs(x, clf.input, self.patch, self.stride)
        scores = _batched(clf, batch)
        batched = scores is not None
        if scores is None:
            scorer = scorer or Scorer(clf)
            scores = scorer(batch)
        drops = (base[None, :] - scores[:, classes]).T.reshape(len(classes), rows, cols)
        _, h, w, _ = x.shape
        gh, gw = clf.feature_shape[1:3]
        maps = np.stack([
            cv2.resize(pixel_map(d, h, w, self.patch, self.stride), (gw, gh), interpolation=cv2.INTER_AREA)
            for d in drops
        ]).astype(np.float32)
        return Maps(maps, 1 + (1 if batched else len(batch)), time.perf_counter() - start,
                    f"{rows}x{cols} positions", "one batched invoke()" if batched else scorer.how())


def _batched(clf: Classifier, batch: np.ndarray) -> np.ndarray | None:
    """All occluded frames in one invoke() on a second interpreter, or None when the model refuses."""
    try:
        it = clf.resized_interpreter(list(batch.shape))
        clf.set_input(it, batch)
        it.invoke()
        raw = {t: it.get_tensor(t) for t in (clf.head.output, clf.head.logits)}
    except (RuntimeError, ValueError) as exc:
        # The shared MobileNetV2 models have reshapes of a fixed batch of 1, which XNNPACK refuses.
        log.debug("occlusion: no batch of %d (%s); one invoke() per position", len(batch), str(exc)[:120])
        return None
    if any(t.shape[0] != len(batch) for t in raw.values()):
        return None
    return clf.scores(raw, len(batch))
