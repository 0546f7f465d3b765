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

from edgecam.core.model import Classifier
from edgecam.core.preprocess import InputSpec

log = logging.getLogger("edgecam")


@dataclass
class Occlusion:
    maps: np.ndarray  # [n_classes, grid rows, grid cols] score drops, on the CAM's grid
    positions: tuple[int, int]  # patch positions, rows x cols
    inferences: int
    seconds: float
    batched: bool


def grey(spec: InputSpec) -> float:
    """A mid-grey pixel in the input's own encoding."""
    if spec.dtype == np.uint8:
        return 128.0
    if spec.dtype == np.int8:
        return 0.0
    return (128.0 - spec.mean) / spec.std


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Patch origins along one side, the last one flush with the edge so every pixel is covered."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def occluded_inputs(x: np.ndarray, spec: InputSpec, patch: int, stride: int) -> tuple[np.ndarray, int, int]:
    """Every occluded copy of x [1, H, W, 3], as [rows * cols, H, W, 3], and the grid's shape."""
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


def occlusion_maps(
    clf: Classifier, x: np.ndarray, classes: list[int], patch: int = 56, stride: int = 28
) -> Occlusion:
    """Score drops of `classes` for each patch position. One batched invoke() where the model's input
    can be resized to a batch; else one invoke() per position."""
    start = time.perf_counter()
    base = clf.infer(x).scores[classes]
    batch, rows, cols = occluded_inputs(x, clf.input, patch, stride)
    scores = _batched(clf, batch)
    batched = scores is not None
    if scores is None:
        scores = np.stack([clf.infer(batch[k : k + 1]).scores for k in range(len(batch))])
    drops = (base[None, :] - scores[:, classes]).T.reshape(len(classes), rows, cols)
    _, h, w, _ = x.shape
    gh, gw = clf.feature_shape[1:3]
    maps = np.stack(
        [cv2.resize(pixel_map(d, h, w, patch, stride), (gw, gh), interpolation=cv2.INTER_AREA) for d in drops]
    ).astype(np.float32)
    return Occlusion(maps, (rows, cols), 1 + (1 if batched else len(batch)), time.perf_counter() - start, batched)


def _batched(clf: Classifier, batch: np.ndarray) -> np.ndarray | None:
    """All occluded frames in one invoke() on a second interpreter, or None when the model refuses."""
    try:
        it = clf.resized_interpreter(list(batch.shape))
        it.set_tensor(it.get_input_details()[0]["index"], batch)
        it.invoke()
        raw = {t: it.get_tensor(t) for t in (clf.head.output, clf.head.logits)}
    except (RuntimeError, ValueError) as exc:
        # The shared MobileNetV2 models have reshapes of a fixed batch of 1, which XNNPACK refuses.
        log.debug("occlusion: no batch of %d (%s); one invoke() per position", len(batch), str(exc)[:120])
        return None
    if any(t.shape[0] != len(batch) for t in raw.values()):
        return None
    return clf.scores(raw, len(batch))
