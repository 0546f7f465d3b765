"""Aspect-preserving CAM: the frame's short side at the model's input size, the long side in proportion.

A global MEAN over height and width does not care how wide the map is, so a model pooled that way
(the Keras MobileNetV2) can take a 224x398 input for a 16:9 frame and give a 7x13 map that covers
the whole view without squashing it. A model whose pooling has a fixed window (AVERAGE_POOL_2D
over 7x7) cannot: it falls back to the square input, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from edgecam.core.methods.cam import Cam
from edgecam.core.model import Classifier
from edgecam.core.preprocess import InputSpec


def wide_size(frame_h: int, frame_w: int, side: int) -> tuple[int, int]:
    """Input (height, width) with the short side at `side` and the frame's aspect kept."""
    if frame_w >= frame_h:
        return side, max(side, round(side * frame_w / frame_h))
    return max(side, round(side * frame_h / frame_w)), side


@dataclass
class WideCam(Cam):
    """The CAM of a widened input: a second interpreter per input shape, resized from the prepared model."""

    name = "wide"
    interpreters: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    # Why the square input is used instead; empty while the wide input works.
    reason: str = field(default="", init=False)

    def input_for(self, clf: Classifier, frame_shape: tuple[int, ...]) -> tuple[InputSpec, Any]:
        if not self.reason and clf.head.pool != "MEAN":
            self.reason = f"the model pools with {clf.head.pool} (a fixed window), so its input cannot be widened"
        if self.reason:
            self.notice = self.reason
            return clf.input, None
        h, w = wide_size(frame_shape[0], frame_shape[1], min(clf.input.height, clf.input.width))
        if (h, w) not in self.interpreters:
            try:
                self.interpreters[(h, w)] = clf.resized_interpreter([1, h, w, clf.input.channels])
            except (RuntimeError, ValueError) as exc:
                self.reason = self.notice = (
                    f"the runtime refused a {h}x{w} input ({' '.join(str(exc).split())[:120]})")
                return clf.input, None
        return replace(clf.input, height=h, width=w), self.interpreters[(h, w)]
