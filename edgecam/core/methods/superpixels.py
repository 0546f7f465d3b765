"""SLIC superpixels (Achanta et al., 2012) in NumPy, on OpenCV's Lab conversion.

Why our own: scikit-image's SLIC would bring SciPy and half a dozen packages to a Raspberry Pi for
one function, and OpenCV's (ximgproc) is only in opencv-contrib, which edgecam does not ship. SLIC is
k-means on colour and position with each centre looking only at a window of twice the grid step, a
few dozen lines; at the model's input size (224x224, 50 segments) it takes a few milliseconds.
Segments are not forced to be connected (the optional last step of the paper): a segment is still
local, as its pixels are within one window of its centre.
"""

from __future__ import annotations

import cv2
import numpy as np


def to_lab(image: np.ndarray) -> np.ndarray:
    """Lab [H, W, 3] float32 of an image in any affine encoding (the model's input: uint8, int8, or
    normalised floats): scaled to 0..1 first. One channel (grayscale) becomes L with a = b = 0."""
    img = image.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.shape[-1] == 1:
        return np.concatenate([img * 100.0, np.zeros_like(img), np.zeros_like(img)], axis=-1)
    return cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2LAB)


def slic(lab: np.ndarray, segments: int, compactness: float = 10.0, iterations: int = 10) -> np.ndarray:
    """Labels [H, W] (0..n-1, n about `segments`) of SLIC superpixels of a Lab image."""
    h, w = lab.shape[:2]
    step = max(1.0, float(np.sqrt(h * w / max(1, segments))))
    ys = np.arange(step / 2, h, step)
    xs = np.arange(step / 2, w, step)
    cy, cx = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    iy, ix = np.clip(cy.astype(int), 0, h - 1), np.clip(cx.astype(int), 0, w - 1)
    centres = np.column_stack([lab[iy, ix], cy, cx]).astype(np.float64)  # [k, 5]: L, a, b, y, x
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    labels = np.zeros((h, w), np.int64)
    weight = (compactness / step) ** 2  # the position term in colour units, as in the paper
    win = int(np.ceil(step))
    for _ in range(iterations):
        best = np.full((h, w), np.inf)
        for k, (cl, ca, cb, y, x) in enumerate(centres):
            y0, y1 = max(0, int(y) - win), min(h, int(y) + win + 1)
            x0, x1 = max(0, int(x) - win), min(w, int(x) + win + 1)
            patch = lab[y0:y1, x0:x1]
            d = ((patch[..., 0] - cl) ** 2 + (patch[..., 1] - ca) ** 2 + (patch[..., 2] - cb) ** 2
                 + weight * ((yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2))
            closer = d < best[y0:y1, x0:x1]
            best[y0:y1, x0:x1][closer] = d[closer]
            labels[y0:y1, x0:x1][closer] = k
        flat = labels.ravel()
        count = np.bincount(flat, minlength=len(centres)).astype(np.float64)
        feats = np.column_stack([lab.reshape(-1, 3), yy.ravel(), xx.ravel()])
        sums = np.stack([np.bincount(flat, feats[:, j], minlength=len(centres)) for j in range(5)], axis=1)
        alive = count > 0  # a centre that won no pixel keeps its place
        centres[alive] = sums[alive] / count[alive, None]
    return np.unique(labels, return_inverse=True)[1].reshape(h, w)
