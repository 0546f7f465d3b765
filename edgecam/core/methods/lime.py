"""LIME for images (Ribeiro et al., 2016), as MATLAB's imageLIME does it: superpixels switched on and
off, a weighted linear model of the class score over which superpixels were on.

Sample 0 keeps every segment; the others keep each with probability 1/2, the rest greyed. Each
sample is one inference. A sample is weighted by how much of the picture it keeps (LIME's kernel on
the cosine distance to the full picture, width 0.25), and a ridge fit with an intercept gives one
weight per segment: the map, painted back onto the segments. Positive: that segment raises the score.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
from edgecam.core.methods.superpixels import slic, to_lab
from edgecam.core.model import Classifier, Inference

KERNEL_WIDTH = 0.25  # LIME's default for images
RIDGE = 1.0  # scikit-learn's Ridge default, which LIME uses


def kernel(kept: np.ndarray, segments: int) -> np.ndarray:
    """Sample weights from the number of segments kept: exp(-d^2 / width^2) ** 0.5, d the cosine
    distance between the sample's on/off vector and all-on, 1 - sqrt(kept / segments)."""
    d = 1.0 - np.sqrt(kept / float(segments))
    return np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2))


def weighted_ridge(z: np.ndarray, y: np.ndarray, weights: np.ndarray, alpha: float = RIDGE) -> np.ndarray:
    """Coefficients [features, targets] of a weighted ridge fit of y [n, targets] on z [n, features],
    with an unpenalised intercept (the data centred on their weighted means)."""
    wsum = float(weights.sum())
    zc = z - (weights @ z) / wsum
    yc = y - (weights @ y) / wsum
    a = zc.T @ (zc * weights[:, None]) + alpha * np.eye(z.shape[1])
    return np.linalg.solve(a, zc.T @ (yc * weights[:, None]))


@dataclass
class Lime(Method):
    name = "lime"
    samples: int = 500
    segments: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("--samples", self.samples, 10, 100_000)
        check_range("--segments", self.segments, 2, 1000)

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        start = time.perf_counter()
        scorer = scorer or Scorer(clf)
        labels = slic(to_lab(x[0]), self.segments)
        n_seg = int(labels.max()) + 1
        rng = np.random.default_rng(self.seed)
        z = (rng.random((self.samples, n_seg)) < 0.5).astype(np.float64)
        z[0] = 1.0
        fill = grey(clf.input)
        on = z.astype(np.float32)
        step = CHUNK * max(1, scorer.workers)  # the samples' masks made a step at a time, not all at once
        scores = np.concatenate([
            mask_scores(scorer, x, on[i : i + step][:, labels], fill) for i in range(0, self.samples, step)
        ])[:, classes]
        coef = weighted_ridge(z, scores.astype(np.float64), kernel(z.sum(axis=1), n_seg))  # [segments, classes]
        pixel_maps = coef.T[:, labels]  # [classes, H, W]
        return Maps(to_grid(pixel_maps, fine_grid(clf.input)), 1 + self.samples, time.perf_counter() - start,
                    f"{n_seg} segments, {self.samples} samples", scorer.how())
