"""Class activation maps: pure NumPy, no interpreter.

CAM_c(y, x) = sum_k w_ck A_k(y, x), with A the last feature map and w_c the
classifier's (dequantized) weights for class c. For a global-average-pool +
linear head, mean_yx CAM_c + b_c is exactly the logit of c, which is what makes
the map an explanation of the score rather than a picture of activations.

Grad-CAM weights channel k by the spatial mean of d logit_c / d A_k. Through a
global average pool of an H x W map that gradient is w_ck / (H * W) everywhere,
so Grad-CAM = ReLU(CAM_c) / (H * W): the same map, clipped at zero and scaled.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ClassRows(Protocol):
    """Weights [num_classes, C] whose rows `w[classes]` gives as float32 [len(classes), C]."""

    def __getitem__(self, classes: np.ndarray, /) -> np.ndarray: ...


def class_maps(features: np.ndarray, weights: ClassRows, classes: list[int] | np.ndarray) -> np.ndarray:
    """Raw CAMs [len(classes), H, W] from features [H, W, C] and weights [num_classes, C] (an array, or
    the head's ClassWeights, which dequantizes only the rows asked for).

    One matrix product for all requested classes.
    """
    h, w, c = features.shape
    sel = weights[np.asarray(classes, dtype=np.intp)]  # [n, C]
    maps = features.reshape(h * w, c) @ sel.T  # [H*W, n]
    return np.ascontiguousarray(maps.T.reshape(len(sel), h, w))


def grad_cam_weights(weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """Grad-CAM's channel weights for a GAP + linear head: the gradient of each logit."""
    return weights / float(height * width)


def grad_cam(features: np.ndarray, weights: ClassRows, classes: list[int] | np.ndarray) -> np.ndarray:
    """Grad-CAM maps [n, H, W] computed the Grad-CAM way: ReLU(sum_k alpha_ck A_k)."""
    h, w, _ = features.shape
    sel = weights[np.asarray(classes, dtype=np.intp)]
    alpha = grad_cam_weights(sel, h, w)
    return np.maximum(class_maps(features, alpha, np.arange(len(sel))), 0.0)


def normalize(cam: np.ndarray) -> np.ndarray:
    """Min-max scaled to 0..1 (a flat map becomes all zeros)."""
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(cam, dtype=np.float32)
    return ((cam - lo) / (hi - lo)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (one row of logits, or a batch of rows)."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (ties by lower index)."""
    k = max(1, min(k, scores.size))
    idx = np.argpartition(-scores, k - 1)[:k]
    return idx[np.lexsort((idx, -scores[idx]))]
