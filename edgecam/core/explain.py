"""`edgecam explain`: classify image files and explain each with CAMs, offline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecam.core import cam as cam_math
from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import Box, to_input


@dataclass
class Explanation:
    """One frame's prediction and maps: what explain prints and the daemon publishes."""

    top: list[tuple[int, str, float]]  # (id, label, score), best first
    cam_ids: list[int]  # top-1 first, then the classes asked for
    cams: np.ndarray  # raw maps [len(cam_ids), H, W]
    box: Box
    view: np.ndarray | None = None  # the box of the frame, scaled down on the way to the model (BGR)


def explain_frame(
    clf: Classifier,
    frame_bgr: np.ndarray,
    top_k: int = 3,
    extra: list[int] | None = None,
    crop: bool = False,
    exact: bool = False,
    timing: dict[str, float] | None = None,
) -> Explanation:
    """Preprocess, one invoke(), top-k, and the CAMs of top-1 and `extra`, in one product.

    With `timing`, the milliseconds of each stage are stored in it: pre, infer, cam.
    """
    t0 = time.perf_counter()
    keep: dict = {}
    x, box = to_input(frame_bgr, clf.input, crop, exact, keep)
    t1 = time.perf_counter()
    inf = clf.infer(x)
    t2 = time.perf_counter()
    exp = explain_inference(clf, inf, box, top_k, extra, keep.get("view"))
    if timing is not None:
        t3 = time.perf_counter()
        timing.update(pre=(t1 - t0) * 1e3, infer=(t2 - t1) * 1e3, cam=(t3 - t2) * 1e3)
    return exp


def explain_inference(
    clf: Classifier,
    inf: Inference,
    box: Box,
    top_k: int = 3,
    extra: list[int] | None = None,
    view: np.ndarray | None = None,
) -> Explanation:
    """Top-k and the CAMs of top-1 and `extra` from one inference."""
    idx = cam_math.top_k(inf.scores, top_k)
    top = [(int(i), clf.labels[int(i)], float(inf.scores[i])) for i in idx]
    cam_ids = [top[0][0]] + [c for c in (extra or []) if c != top[0][0]]
    return Explanation(top, cam_ids, clf.cams(inf, cam_ids), box, view)


def to_json(image: str, model: str, exp: Explanation, labels: list[str]) -> dict[str, Any]:
    return {
        "image": image,
        "model": model,
        "top": [{"id": i, "label": lab, "score": round(s, 5)} for i, lab, s in exp.top],
        "cams": [
            {"id": c, "label": labels[c], "map": np.round(m, 5).tolist()}
            for c, m in zip(exp.cam_ids, exp.cams, strict=True)
        ],
    }
