"""Aspect-preserving CAM: the frame's short side at the model's input size, the long side in proportion.

A global MEAN over height and width does not care how wide the map is, so a model pooled that way
(the Keras MobileNetV2) can take a 224x398 input for a 16:9 frame and give a 7x13 map that covers
the whole view without squashing it. A model whose pooling has a fixed window (AVERAGE_POOL_2D
over 7x7) cannot: it falls back to the square input, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np

from edgecam.core.explain import Explanation, explain_frame, explain_inference
from edgecam.core.model import Classifier
from edgecam.core.preprocess import to_input

log = logging.getLogger("edgecam")


def wide_size(frame_h: int, frame_w: int, side: int) -> tuple[int, int]:
    """Input (height, width) with the short side at `side` and the frame's aspect kept."""
    if frame_w >= frame_h:
        return side, max(side, round(side * frame_w / frame_h))
    return max(side, round(side * frame_h / frame_w)), side


class WideCam:
    """A second interpreter per input shape, resized from the classifier's prepared model."""

    def __init__(self, clf: Classifier) -> None:
        self.clf = clf
        self.interpreters: dict[tuple[int, int], Any] = {}
        self.reason = "" if clf.head.pool == "MEAN" else (
            f"the model pools with {clf.head.pool} (a fixed window), so its input cannot be widened"
        )

    def _interpreter(self, h: int, w: int) -> Any:
        if (h, w) not in self.interpreters:
            self.interpreters[(h, w)] = self.clf.resized_interpreter([1, h, w, 3])
        return self.interpreters[(h, w)]

    def explain(self, frame: np.ndarray, top_k: int = 3, extra: list[int] | None = None) -> Explanation:
        clf = self.clf
        if self.reason:
            return explain_frame(clf, frame, top_k, extra)
        h, w = wide_size(frame.shape[0], frame.shape[1], min(clf.input.height, clf.input.width))
        try:
            it = self._interpreter(h, w)
        except (RuntimeError, ValueError) as exc:
            self.reason = f"the runtime refused a {h}x{w} input ({' '.join(str(exc).split())[:120]})"
            return explain_frame(clf, frame, top_k, extra)
        spec = replace(clf.input, height=h, width=w)
        x, box = to_input(frame, spec)
        return explain_inference(clf, clf.infer(x, it), box, top_k, extra)
