"""Score-CAM (Wang et al., 2020) at any stage of the network: channels weighted by what they make the
model say, with no gradient.

Each channel of the stage's feature map, upsampled to the input and scaled to 0..1, masks the input
(greyed where the channel is quiet); the class score of that masked input, less the score of an
all-grey input, weights the channel; the map is the ReLU of the weighted sum of the channels, on the
stage's own grid. Only the K most active channels (highest mean) are used, so a stage of 1280
channels costs K + 1 inferences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edgecam.core.errors import EdgecamError
from edgecam.core.layers import Stage, stage_interpreter, stage_tensors, stages
from edgecam.core.methods.base import ChannelWeighted, Scorer, check_range, grey, mask_scores
from edgecam.core.model import Classifier, Inference


def find_stage(clf: Classifier, stage: str) -> Stage:
    """`last`, a stage's number (1 = nearest the input, as `edgecam layers` lists them), or a tensor's
    name (the short name `layers` prints, or the full one) of a [1, h, w, C] activation."""
    found = stages(clf)
    if stage == "last":
        return found[-1]
    if stage.isdigit():
        k = int(stage)
        if not 1 <= k <= len(found):
            raise EdgecamError(f"--stage {stage}: this model has stages 1 to {len(found)} (see edgecam layers)")
        return found[k - 1]
    for s in found:
        if stage in (s.name, clf.graph.tensors[s.index].name):
            return s
    for i, t in enumerate(clf.graph.tensors):
        if stage in (t.name, t.name.split(";")[0]):
            if len(t.shape) != 4 or t.shape[0] != 1:
                raise EdgecamError(f"--stage {stage}: shape {list(t.shape)} is not a [1, h, w, C] feature map")
            return Stage(i, stage, tuple(t.shape))
    raise EdgecamError(f"--stage {stage!r}: no such stage or tensor (stages are 1 to {len(found)}, or 'last')")


@dataclass
class ScoreCam(ChannelWeighted):
    name = "scorecam"
    relu = True
    stage: str = "last"
    channels: int = 128
    # The interpreters that also output a stage's tensor, by classifier and tensor.
    _interpreters: dict[tuple[int, int], Any] = field(default_factory=dict, init=False, repr=False)
    _found: dict[int, Stage] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.stage = str(self.stage)
        check_range("--channels", self.channels, 1, 100_000)

    def where(self, clf: Classifier) -> Stage:
        if id(clf) not in self._found:
            self._found[id(clf)] = find_stage(clf, self.stage)
        return self._found[id(clf)]

    def activations(self, clf: Classifier, x: np.ndarray, inference: Inference) -> np.ndarray:
        stage = self.where(clf)
        if stage.index == clf.head.feature:
            return inference.features
        key = (id(clf), stage.index)
        if key not in self._interpreters:
            self._interpreters[key] = stage_interpreter(clf, [stage])
        return stage_tensors(clf, self._interpreters[key], x, [stage])[0]

    def channel_weights(self, clf: Classifier, x: np.ndarray, inference: Inference, acts: np.ndarray,
                        classes: list[int], scorer: Scorer | None) -> tuple[np.ndarray, int, str]:
        scorer = scorer or Scorer(clf)
        _, h, w, _ = x.shape
        flat = acts.reshape(-1, acts.shape[-1])
        spread = flat.max(axis=0) - flat.min(axis=0)
        live = np.flatnonzero(spread > 1e-6)  # a flat channel masks nothing in particular
        keep = live[np.argsort(-flat[:, live].mean(axis=0), kind="stable")[: self.channels]]
        masks = np.empty((len(keep), h, w), np.float32)
        for j, k in enumerate(keep):
            up = cv2.resize(acts[..., k].astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
            masks[j] = (up - up.min()) / max(float(up.max() - up.min()), 1e-12)
        fill = grey(clf.input)
        base = mask_scores(scorer, x, np.zeros((1, h, w), np.float32), fill)[0, classes]
        weights = np.zeros((len(classes), acts.shape[-1]), np.float32)
        if len(keep):
            weights[:, keep] = (mask_scores(scorer, x, masks, fill)[:, classes] - base[None, :]).T
        stage = self.where(clf)
        _, sh, sw, sc = stage.shape
        detail = f"stage {stage.name} {sh}x{sw}x{sc}, {len(keep)} channels"
        return weights, 1 + len(keep), detail

    def activation_runs(self, clf: Classifier) -> int:
        return 0 if self.where(clf).index == clf.head.feature else 1
