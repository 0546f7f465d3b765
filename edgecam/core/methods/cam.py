"""CAM: the classifier's own weights over the last feature map, from the prediction's inference alone."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgecam.core.methods.base import Maps, Method, Scorer
from edgecam.core.model import Classifier, Inference


@dataclass
class Cam(Method):
    """Raw (signed) class activation maps on the feature map's grid: mean(map) + bias is the logit."""

    name = "cam"
    summary = "the class activation map: the classifier's weights over the last feature map (no extra inference)"
    cost = "frame"

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        start = time.perf_counter()
        maps = clf.cams(inference, classes)
        return Maps(maps, 1, time.perf_counter() - start)
