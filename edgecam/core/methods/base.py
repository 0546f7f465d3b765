"""What every explanation method is: a name, a cost, and maps of the classes asked for on a grid.

The pipeline around a method is the same for all of them and lives in one place (core/explain.py):
the frame is prepared for the model, one inference gives the prediction, and the method is asked
for the maps of the classes to explain. A method says only how it turns that picture and that
inference into maps: CAM from the classifier's weights and the feature map it already has,
occlusion and the sampling methods from more inferences on changed copies of the input.

A method may change how the frame is prepared (the wide CAM widens the input) through input_for().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import InputSpec

# How much a map costs beyond the prediction's own inference, which decides where it is offered:
# "frame": nothing, or next to nothing (the daemon may run it on every frame);
# "map": tens of inferences (offered offline, and in evaluate by default);
# "many": hundreds (offered offline; evaluate runs it when asked).
COSTS = ("frame", "map", "many")


@dataclass
class Maps:
    """A method's answer for one picture."""

    maps: np.ndarray  # float32 [len(classes), rows, cols]: one map per class asked for, on the method's grid
    inferences: int = 1  # model runs for the prediction and these maps together
    seconds: float = 0.0  # time spent on the maps (the prediction's inference not included)
    detail: str = ""  # what the method did, for a line on stderr ("7x7 positions")
    how: str = ""  # how the inferences ran ("one invoke() each", "2 interpreters")


class Method:
    """One explanation method. Options are dataclass fields on the subclass; the registry builds it."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and the docs
    cost: ClassVar[str] = "frame"
    # A method that prepares its own input (another shape) cannot be scored on the square input.
    square_input: ClassVar[bool] = True

    notice: str = ""  # set when the method had to change its plan (the wide CAM falling back)

    def input_for(self, clf: Classifier, frame_shape: tuple[int, ...]) -> tuple[InputSpec, Any]:
        """The input to prepare the frame for, and the interpreter to run it on (None: the classifier's)."""
        return clf.input, None

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        """Maps of `classes` for the prepared input x, whose inference is `inference`."""
        raise NotImplementedError


class Scorer:
    """A batch of prepared inputs [n, H, W, C] -> class probabilities [n, classes].

    This one runs them one invoke() after another on the classifier's own interpreter; the device
    layer has one that spreads them over several interpreters, one thread each (core has no threads).
    """

    workers = 1

    def __init__(self, clf: Classifier) -> None:
        self.clf = clf

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([self.clf.infer(batch[k : k + 1]).scores for k in range(len(batch))])

    def how(self) -> str:
        return "one invoke() each" if self.workers == 1 else f"one invoke() each on {self.workers} interpreters"
