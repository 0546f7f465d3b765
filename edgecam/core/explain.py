"""The per-frame pipeline: prepare the frame, one inference, top-k, and the maps of an explanation
method (the CAM unless another is given) for top-1 and the classes asked for."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecam.core import cam as cam_math
from edgecam.core.methods import Maps, Method, Scorer, make
from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import Box, to_input

CAM = make("cam")


@dataclass
class Explanation:
    """One frame's prediction and maps: what explain prints and the daemon publishes."""

    top: list[tuple[int, str, float]]  # (id, label, score), best first
    cam_ids: list[int]  # top-1 first, then the classes asked for
    cams: np.ndarray  # raw maps [len(cam_ids), H, W], of the method used (the CAM by default)
    box: Box
    view: np.ndarray | None = None  # the box of the frame, scaled down on the way to the model (BGR)
    made: Maps | None = None  # the method's account: inferences, time, what it did


def explain_frame(
    clf: Classifier,
    frame_bgr: np.ndarray,
    top_k: int = 3,
    extra: list[int] | None = None,
    crop: bool = False,
    exact: bool | None = None,
    timing: dict[str, float] | None = None,
    method: Method = CAM,
    scorer: Scorer | None = None,
) -> Explanation:
    """Preprocess, one invoke(), top-k, and the method's maps of top-1 and `extra`.

    With `timing`, the milliseconds of each stage are stored in it: pre, infer, cam (the maps).
    """
    t0 = time.perf_counter()
    keep: dict = {}
    spec, interpreter = method.input_for(clf, frame_bgr.shape)
    x, box = to_input(frame_bgr, spec, crop, exact, keep)
    t1 = time.perf_counter()
    inf = clf.infer(x, interpreter)
    t2 = time.perf_counter()
    exp = explain_inference(clf, inf, box, top_k, extra, keep.get("view"), method, x, scorer)
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
    method: Method = CAM,
    x: np.ndarray | None = None,
    scorer: Scorer | None = None,
) -> Explanation:
    """Top-k and the method's maps of top-1 and `extra` from one inference (of x, which the
    methods that run the model again need)."""
    idx = cam_math.top_k(inf.scores, top_k)
    top = [(int(i), clf.labels[int(i)], float(inf.scores[i])) for i in idx]
    cam_ids = [top[0][0]] + [c for c in (extra or []) if c != top[0][0]]
    made = method.maps(clf, x, inf, cam_ids, scorer)  # type: ignore[arg-type]
    return Explanation(top, cam_ids, made.maps, box, view, made)


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
