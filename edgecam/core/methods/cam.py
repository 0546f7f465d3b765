"""CAM: the classifier's own weights over the last feature map, from the prediction's inference alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecam.core.methods.base import ChannelWeighted, Scorer
from edgecam.core.model import Classifier, Inference


@dataclass
class Cam(ChannelWeighted):
    """Raw (signed) class activation maps on the feature map's grid: mean(map) + bias is the logit."""

    name = "cam"

    def channel_weights(self, clf: Classifier, x: np.ndarray, inference: Inference, acts: np.ndarray,
                        classes: list[int], scorer: Scorer | None) -> tuple[np.ndarray, int, str]:
        return clf.head.weights[np.asarray(classes, dtype=np.intp)], 0, ""
