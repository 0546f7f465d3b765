"""RISE (Petsiuk et al., 2018): random masks, the class scores as their weights.

Each mask is a coarse random grid of cells (each kept with probability 1/2), upsampled bilinearly
to one cell more than the input and cut at a random shift, so its soft edges fall anywhere. The map
is the score-weighted sum of the masks over N * p: the expected score when a pixel is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from edgecam.core.methods.base import (
    CHUNK,
    Maps,
    Method,
    Scorer,
    check_range,
    fine_grid,
    grey,
    mask_scores,
    to_grid,
)
from edgecam.core.model import Classifier, Inference

KEEP = 0.5  # the paper's p


def rise_masks(rng: np.random.Generator, n: int, cells: int, height: int, width: int) -> np.ndarray:
    """n soft masks [n, H, W] in 0..1."""
    ch, cw = math.ceil(height / cells), math.ceil(width / cells)
    out = np.empty((n, height, width), np.float32)
    for i in range(n):
        grid = (rng.random((cells, cells)) < KEEP).astype(np.float32)
        up = cv2.resize(grid, ((cells + 1) * cw, (cells + 1) * ch), interpolation=cv2.INTER_LINEAR)
        dy, dx = int(rng.integers(0, ch)), int(rng.integers(0, cw))
        out[i] = up[dy : dy + height, dx : dx + width]
    return out


@dataclass
class Rise(Method):
    name = "rise"
    samples: int = 1000
    cells: int = 7
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("--samples", self.samples, 10, 100_000)
        check_range("--cells", self.cells, 2, 64)

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        start = time.perf_counter()
        scorer = scorer or Scorer(clf)
        _, h, w, _ = x.shape
        rng = np.random.default_rng(self.seed)
        fill = grey(clf.input)
        total = np.zeros((len(classes), h * w), np.float64)
        # Masks are drawn in order from one generator and scored a chunk at a time: the same seed gives
        # the same map whatever the number of workers, and memory stays at one chunk.
        step = CHUNK * max(1, scorer.workers)
        for i in range(0, self.samples, step):
            masks = rise_masks(rng, min(step, self.samples - i), self.cells, h, w)
            scores = mask_scores(scorer, x, masks, fill)[:, classes]  # [n, classes]
            total += scores.T.astype(np.float64) @ masks.reshape(len(masks), -1)
        pixel_maps = (total / (self.samples * KEEP)).reshape(len(classes), h, w)
        return Maps(to_grid(pixel_maps, fine_grid(clf.input)), 1 + self.samples, time.perf_counter() - start,
                    f"{self.samples} masks of {self.cells}x{self.cells} cells", scorer.how())
