"""The random baseline: uniform noise on the CAM's grid. Every real method must beat it in evaluate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecam.core.methods.base import Maps, Method, Scorer
from edgecam.core.model import Classifier, Inference


@dataclass
class RandomMap(Method):
    name = "random"
    seed: int = 0

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        rng = np.random.default_rng(self.seed)
        gh, gw = clf.feature_shape[1:3]
        return Maps(rng.random((len(classes), gh, gw)).astype(np.float32), 1)
