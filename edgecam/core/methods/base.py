"""What every explanation method is: a name, a cost, and maps of the classes asked for on a grid.

The pipeline around a method is the same for all of them and lives in one place (core/explain.py):
the frame is prepared for the model, one inference gives the prediction, and the method is asked
for the maps of the classes to explain. A method says only how it turns that picture and that
inference into maps: CAM from the classifier's weights and the feature map it already has,
occlusion and the sampling methods from more inferences on changed copies of the input.

A method may change how the frame is prepared (the wide CAM widens the input) through input_for().
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from edgecam.core import cam as cam_math
from edgecam.core.errors import EdgecamError
from edgecam.core.methods.registry import REGISTRY
from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import InputSpec

CHUNK = 32  # masked inputs made and scored at a time: a RISE of 1000 masks never holds 1000 inputs


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
    # From the method's entry in the registry (methods/registry.py), where they are declared.
    summary: ClassVar[str]
    cost: ClassVar[str]
    square_input: ClassVar[bool]

    notice: str = ""  # set when the method had to change its plan (the wide CAM falling back)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return  # a family of methods (ChannelWeighted), not one
        info = REGISTRY.get(name)
        if info is None:
            raise TypeError(f"method {name!r} ({cls.__name__}) has no entry in methods/registry.py")
        cls.summary, cls.cost, cls.square_input = info.summary, info.cost, info.square_input

    def input_for(self, clf: Classifier, frame_shape: tuple[int, ...]) -> tuple[InputSpec, Any]:
        """The input to prepare the frame for, and the interpreter to run it on (None: the classifier's)."""
        return clf.input, None

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        """Maps of `classes` for the prepared input x, whose inference is `inference`."""
        raise NotImplementedError


class ChannelWeighted(Method):
    """The maps as a weighted sum of a feature map's channels, sum_k w_ck A_k (ReLU'd if `relu`).

    The pipeline is here; a method says only which activations (`activations`) and how it weights
    their channels for each class (`channel_weights`): CAM with the classifier's weights, Score-CAM
    with the class score of the input masked by each channel.
    """

    relu: ClassVar[bool] = False

    def activations(self, clf: Classifier, x: np.ndarray, inference: Inference) -> np.ndarray:
        """The feature map [h, w, C] whose channels are weighted."""
        return inference.features

    def channel_weights(self, clf: Classifier, x: np.ndarray, inference: Inference, acts: np.ndarray,
                        classes: list[int], scorer: Scorer | None) -> tuple[np.ndarray, int, str]:
        """Weights [len(classes), C], the inferences spent on them, and a note for stderr."""
        raise NotImplementedError

    def maps(self, clf: Classifier, x: np.ndarray, inference: Inference, classes: list[int],
             scorer: Scorer | None = None) -> Maps:
        start = time.perf_counter()
        made = self.maps_of(clf, x, inference, self.activations(clf, x, inference), classes, scorer, start)
        made.inferences += self.activation_runs(clf)
        return made

    def activation_runs(self, clf: Classifier) -> int:
        """Inferences `activations` takes (none when they come with the prediction)."""
        return 0

    def maps_of(self, clf: Classifier, x: np.ndarray, inference: Inference, acts: np.ndarray, classes: list[int],
                scorer: Scorer | None = None, start: float | None = None) -> Maps:
        """The maps from activations the caller already has (`edgecam layers` has every stage's)."""
        start = time.perf_counter() if start is None else start
        weights, runs, detail = self.channel_weights(clf, x, inference, acts, classes, scorer)
        maps = cam_math.class_maps(acts, weights, np.arange(len(classes)))
        if self.relu:
            maps = np.maximum(maps, 0.0)
        how = (scorer or Scorer(clf)).how() if runs else ""
        return Maps(maps.astype(np.float32), 1 + runs, time.perf_counter() - start, detail, how)


def grey(spec: InputSpec) -> np.ndarray:
    """A mid-grey pixel in the input's own encoding, one value per channel: what hidden parts of the
    input become."""
    return spec.lut[128]


def masked(x: np.ndarray, masks: np.ndarray, fill: float) -> np.ndarray:
    """Copies of x [1, H, W, C], each kept where its mask [n, H, W] is 1 and grey where it is 0:
    fill + m * (x - fill), in place on one float buffer (this runs once per inference)."""
    out = masks[..., None] * (x[0].astype(np.float32) - np.float32(fill))
    out += np.float32(fill)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    return out.astype(x.dtype)


def mask_scores(scorer: Scorer, x: np.ndarray, masks: np.ndarray, fill: float) -> np.ndarray:
    """Class probabilities [n, classes] of x under each mask [n, H, W] (the scorer makes the inputs)."""
    return scorer.masked(x, masks, fill)


def fine_grid(spec: InputSpec) -> tuple[int, int]:
    """The grid of the pixel-level methods (LIME, RISE): a quarter of the input's side, so a
    superpixel's edge survives and a JSON map stays small (56x56 at 224)."""
    if min(spec.height, spec.width) < 64:
        return spec.height, spec.width
    return spec.height // 4, spec.width // 4


def to_grid(pixel_maps: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Maps [n, H, W] averaged down onto grid (rows, cols)."""
    return np.stack([cv2.resize(m.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
                     for m in pixel_maps]).astype(np.float32)


def check_range(flag: str, value: int, low: int, high: int) -> None:
    """A method's option in low..high, else one line naming the flag."""
    if not low <= value <= high:
        raise EdgecamError(f"{flag} {value}: must be from {low} to {high}")


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

    def masked(self, x: np.ndarray, masks: np.ndarray, fill: float) -> np.ndarray:
        """Scores [n, classes] of x under each mask [n, H, W], CHUNK masked inputs made at a time: a RISE
        of 1000 masks never holds 1000 inputs."""
        return np.concatenate([self(masked(x, masks[i : i + CHUNK], fill)) for i in range(0, len(masks), CHUNK)])

    def how(self) -> str:
        return "one invoke() each" if self.workers == 1 else f"one invoke() each on {self.workers} interpreters"
