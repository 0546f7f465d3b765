"""`edgecam layers`: how the network goes from edges to parts to objects, stage by stage.

A stage is found from the graph alone: walking the operators in order, the last 4-D activation
at each spatial size before the maps get smaller (for MobileNetV2 at 224: 112, 56, 28, 14 and
7 pixels), ending with the CAM's feature map. Those tensors are added to the model's outputs (as
for the CAM), one invoke() gives them all, and each is drawn as its channel-mean map over the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgecam.core.model import Classifier, dequantized
from edgecam.core.render import heat_u8, jet_u8
from edgecam.core.runtime import make_interpreter
from edgecam.core.tflite_graph import with_outputs

PADDING = {"PAD", "PADV2", "MIRROR_PAD"}


@dataclass
class Stage:
    index: int  # tensor index
    name: str
    shape: tuple[int, ...]


def stages(clf: Classifier) -> list[Stage]:
    """The last activation at each spatial size, in order, ending with the feature map."""
    t = clf.graph.tensors
    last: dict[tuple[int, int], int] = {}
    order: list[tuple[int, int]] = []
    for op in clf.graph.operators:
        if op.op in PADDING:
            continue  # a padded copy (226x226 before a stride-2 convolution) is not a stage of its own
        for out in op.outputs:
            shape = t[out].shape
            if len(shape) != 4 or shape[0] != 1 or min(shape[1], shape[2]) < 2 or out in clf.graph.inputs:
                continue
            if (shape[1], shape[2]) == (clf.input.height, clf.input.width) and shape[3] == clf.input.channels:
                continue  # the input itself, (de)quantized or transposed: not a stage
            size = (shape[1], shape[2])
            if order and size != order[-1] and size in last:
                continue  # a side branch back at an earlier size: not the main path
            if size not in last:
                order.append(size)
            last[size] = out
            if out == clf.head.feature:
                break
        if clf.head.feature in last.values():
            break
    found = [Stage(last[s], short_name(t[last[s]].name), tuple(t[last[s]].shape)) for s in order]
    if not found or found[-1].index != clf.head.feature:
        feature = clf.head.feature
        found.append(Stage(feature, short_name(t[feature].name), tuple(t[feature].shape)))
    return found


def short_name(name: str) -> str:
    """A converter's fused name ("A/relu6;StatefulPartitionedCall/A/relu6;...") cut to its first part."""
    return name.split(";")[0].removeprefix("StatefulPartitionedCall/")


def stage_interpreter(clf: Classifier, found: list[Stage]) -> Any:
    """An interpreter of the model whose outputs also include these stages' tensors."""
    return make_interpreter(with_outputs(clf.prepared, [s.index for s in found if s.index != clf.head.feature]),
                            clf.num_threads)


def stage_tensors(clf: Classifier, interpreter: Any, x: np.ndarray, found: list[Stage]) -> list[np.ndarray]:
    """Every stage's activation [h, w, C] for the prepared input x, from one invoke()."""
    clf.set_input(interpreter, x)
    interpreter.invoke()
    t = clf.graph.tensors
    return [dequantized(t[s.index].quant, interpreter.get_tensor(s.index))[0] for s in found]


def picture(frame: np.ndarray, found: list[Stage], maps: list[np.ndarray], panel_width: int = 320,
            class_maps: list[np.ndarray] | None = None, class_label: str = "") -> np.ndarray:
    """One picture: the frame, then each stage's map over it, labelled with name and shape.

    With `class_maps` (one per stage: how that stage's channels make the case for one class), each
    stage gets a row: its activation, and beside it the class map.
    """
    h, w = frame.shape[:2]
    ph = round(panel_width * h / w)
    small = cv2.resize(frame, (panel_width, ph), interpolation=cv2.INTER_AREA)

    def over(m: np.ndarray) -> np.ndarray:
        return cv2.addWeighted(jet_u8(heat_u8(m, panel_width, ph)), 0.55, small, 0.45, 0.0)

    def stage_label(stage: Stage) -> tuple[str, str]:
        _, sh, sw, sc = stage.shape
        name = stage.name if len(stage.name) <= 40 else ".../" + "/".join(stage.name.split("/")[-3:])
        return name[-44:], f"{sh}x{sw}x{sc}"

    panels = [_label(small.copy(), "input", f"{w}x{h}")]
    if class_maps is not None:
        panels.append(_label(small.copy(), f"class: {class_label}"[:44], "activation | class map (Score-CAM)"))
        for stage, m, c in zip(found, maps, class_maps, strict=True):
            name, shape = stage_label(stage)
            panels.append(_label(over(m), name, f"{shape} activation"))
            flat = float(c.max()) <= 0.0  # no channel raised the score: nothing to draw
            panels.append(_label(over(c) if not flat else small // 3, name, f"{shape} {class_label[:20]}"
                                 + (" (none)" if flat else "")))
        cols = 2
    else:
        for stage, m in zip(found, maps, strict=True):
            panels.append(_label(over(m), *stage_label(stage)))
        cols = 3
    while len(panels) % cols:
        panels.append(np.zeros_like(panels[0]))
    rows = [np.hstack(panels[i : i + cols]) for i in range(0, len(panels), cols)]
    return np.vstack(rows)


def _label(img: np.ndarray, name: str, shape: str) -> np.ndarray:
    cv2.rectangle(img, (0, 0), (img.shape[1], 34), (0, 0, 0), -1)
    cv2.putText(img, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(img, shape, (4, 29), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (200, 220, 255), 1, cv2.LINE_AA)
    return img
