"""A quantized TFLite classifier with its CAM head exposed: one invoke() per frame.

At load the model's output list is extended with the feature map and the logits
(see tflite_graph.with_outputs), so the interpreter hands both back from the
same invoke() that produces the scores; no debug mode keeps every tensor alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecam.core import cam as cam_math
from edgecam.core.errors import EdgecamError
from edgecam.core.head import Head, HeadNotFound, find_head, head_from_names
from edgecam.core.labels import fit_labels, read_labels
from edgecam.core.preprocess import InputSpec
from edgecam.core.runtime import Runtime, get_runtime, make_interpreter
from edgecam.core.tflite_graph import Graph, GraphFormatError, Quantization, parse, with_outputs


@dataclass(frozen=True)
class HeadNames:
    """Names of the head's tensors, for graphs the automatic search does not understand."""

    feature: str
    weights: str
    bias: str | None = None


@dataclass
class Inference:
    logits: np.ndarray  # float32 [num_classes]
    scores: np.ndarray  # float32 [num_classes], probabilities
    features: np.ndarray  # float32 [H, W, C], dequantized


def read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EdgecamError(f"{path}: model file not found") from None
    except IsADirectoryError:
        raise EdgecamError(f"{path}: is a directory, not a model file") from None
    except OSError as exc:
        raise EdgecamError(f"{path}: cannot read model ({exc.strerror or exc})") from None


def analyse(path: Path, data: bytes, names: HeadNames | None = None) -> tuple[Graph, Head]:
    try:
        graph = parse(data)
    except GraphFormatError as exc:
        raise EdgecamError(f"{path}: not a usable TFLite model: {exc}") from None
    if len(graph.inputs) != 1:
        raise EdgecamError(f"{path}: has {len(graph.inputs)} inputs; an image classifier has one")
    shape = graph.tensors[graph.inputs[0]].shape
    if len(shape) != 4 or shape[3] != 3:
        raise EdgecamError(f"{path}: input shape {list(shape)} is not an RGB image [1, H, W, 3]")
    try:
        head = head_from_names(graph, names.feature, names.weights, names.bias) if names else find_head(graph)
    except HeadNotFound as exc:
        raise EdgecamError(f"{path}: {exc}") from None
    return graph, head


class Classifier:
    """Loads, validates and runs one model. Not thread-safe: one per inference thread."""

    def __init__(
        self,
        path: Path,
        labels_path: Path | None = None,
        num_threads: int = 2,
        name: str | None = None,
        head_names: HeadNames | None = None,
        mean: float = 127.5,
        std: float = 127.5,
    ) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        data = read_model(self.path)
        self.graph, self.head = analyse(self.path, data, head_names)
        self.runtime: Runtime = get_runtime()
        prepared = with_outputs(data, [self.head.feature, self.head.logits])
        self.prepared = prepared  # kept for resized_interpreter()
        self.num_threads = num_threads
        try:
            self.interpreter: Any = make_interpreter(prepared, num_threads)
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise EdgecamError(f"{self.path}: the interpreter cannot load this model: {reason}") from None
        detail = self.interpreter.get_input_details()[0]
        scale, zp = detail["quantization"]
        _, h, w, _ = (int(v) for v in detail["shape"])
        self.input = InputSpec(h, w, detail["dtype"], float(scale), int(zp), mean, std)
        self._input_index = detail["index"]
        self.labels = fit_labels(
            read_labels(labels_path) if labels_path else None,
            self.head.num_classes,
            str(labels_path) if labels_path else "labels",
        )
        self._score_q = self.graph.tensors[self.head.output].quant
        self._logit_q = self.graph.tensors[self.head.logits].quant
        self._feature_q = self.graph.tensors[self.head.feature].quant

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.graph.tensors[self.head.feature].shape

    def resized_interpreter(self, shape: list[int]) -> Any:
        """A second interpreter of the same prepared model whose input is `shape` (a batch, a wider
        frame). Raises the runtime's RuntimeError or ValueError when the graph cannot take it."""
        it = make_interpreter(self.prepared, self.num_threads)
        it.resize_tensor_input(self._input_index, shape)
        it.allocate_tensors()
        return it

    def raw_outputs(self, x: np.ndarray, interpreter: Any = None) -> dict[int, np.ndarray]:
        """One invoke(); the raw (still quantized) score, logit and feature tensors by index.

        `interpreter`: another interpreter of the same prepared model (one with a resized
        input, say) in place of the classifier's own.
        """
        it = self.interpreter if interpreter is None else interpreter
        it.set_tensor(self._input_index, x)
        try:
            it.invoke()
        except (RuntimeError, ValueError) as exc:
            raise EdgecamError(f"{self.path}: inference failed: {' '.join(str(exc).split())[:300]}") from None
        return {t: it.get_tensor(t) for t in {self.head.output, self.head.logits, self.head.feature}}

    def infer(self, x: np.ndarray, interpreter: Any = None) -> Inference:
        raw = self.raw_outputs(x, interpreter)
        logits = dequantized(self._logit_q, raw[self.head.logits]).reshape(-1)
        features = dequantized(self._feature_q, raw[self.head.feature])[0]
        return Inference(logits, self.scores(raw)[0], features)

    def scores(self, raw: dict[int, np.ndarray], n: int = 1) -> np.ndarray:
        """Class probabilities [n, classes] from the raw outputs of a batch of n: the model's own
        softmax, or one over its logits when it ends without."""
        if self.head.softmax:
            return dequantized(self._score_q, raw[self.head.output]).reshape(n, -1)
        return cam_math.softmax(dequantized(self._logit_q, raw[self.head.logits]).reshape(n, -1))

    def cams(self, inference: Inference, classes: list[int]) -> np.ndarray:
        return cam_math.class_maps(inference.features, self.head.weights, classes)

    def describe(self) -> dict[str, Any]:
        """What `edgecam inspect` prints: what a user checks before deploying a model."""
        t = self.graph.tensors

        def tensor(i: int | None) -> dict[str, Any] | None:
            if i is None:
                return None
            q = t[i].quant
            return {
                "index": i,
                "name": t[i].name,
                "shape": list(t[i].shape),
                "dtype": np.dtype(t[i].dtype).name if t[i].dtype else "unknown",
                "quantization": _quant_summary(q),
            }

        return {
            "model": str(self.path),
            "runtime": str(self.runtime),
            "input": {
                **(tensor(self.graph.inputs[0]) or {}),
                "preprocessing": _input_note(self.input),
            },
            "head": {
                "pool": self.head.pool,
                "linear": self.head.linear,
                "softmax_output": self.head.softmax,
                "feature_map": tensor(self.head.feature),
                "classifier_weights": tensor(self.head.weights_tensor),
                "classifier_bias": tensor(self.head.bias_tensor),
                "logits": tensor(self.head.logits),
                "output": tensor(self.head.output),
            },
            "classes": self.num_classes,
            "labels": f"{len(self.labels)} ({self.labels[0]!r} .. {self.labels[-1]!r})",
        }


def dequantized(q: Quantization, raw: np.ndarray) -> np.ndarray:
    """Real values of a raw output tensor; float tensors pass through as float32."""
    return q.dequantize(raw) if q.quantized else raw.astype(np.float32)


def _quant_summary(q: Quantization) -> str:
    if not q.quantized:
        return "none (float)"
    if q.scale.size == 1:
        return f"per-tensor scale {float(q.scale[0]):.6g} zero point {int(q.zero_point[0])}"
    return f"per-channel on axis {q.axis}: {q.scale.size} scales {float(q.scale.min()):.3g}..{float(q.scale.max()):.3g}"


def _input_note(spec: InputSpec) -> str:
    if spec.dtype == np.uint8:
        return "RGB pixels as uint8"
    if spec.dtype == np.int8:
        return "RGB pixels - 128 as int8"
    return f"(RGB pixel - {spec.mean}) / {spec.std} as float32"
