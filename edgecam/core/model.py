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
from edgecam.core.metadata import ModelMetadata, read_metadata
from edgecam.core.normalization import DEFAULT_NORMALIZATION, Normalization
from edgecam.core.preprocess import InputSpec
from edgecam.core.runtime import Runtime, get_runtime, make_interpreter
from edgecam.core.tflite_graph import (
    Graph,
    GraphFormatError,
    Quantization,
    parse,
    repair_quantized_dimensions,
    with_outputs,
)


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


def input_layout(graph: Graph) -> tuple[str, int]:
    """("NHWC" or "NCHW", channels) of the model's image input; ValueError when it is not an image.

    Channels-last unless the shape can only be channels-first ([1, 3, 224, 224]); a PyTorch
    conversion shows it by a TRANSPOSE to channels-last right after the input.
    """
    shape = graph.tensors[graph.inputs[0]].shape
    if len(shape) == 4 and shape[0] == 1:
        if shape[3] in (1, 3) and shape[1] > 4:
            return "NHWC", shape[3]
        if shape[1] in (1, 3) and shape[3] > 4:
            return "NCHW", shape[1]
    raise ValueError(
        f"input shape {list(shape)} is not an image: expected [1, H, W, 3] (RGB), [1, H, W, 1] (grey) "
        "or channels-first [1, 3, H, W] / [1, 1, H, W]"
    )


def analyse(path: Path, data: bytes, names: HeadNames | None = None) -> tuple[Graph, Head]:
    try:
        graph = parse(data)
    except GraphFormatError as exc:
        raise EdgecamError(f"{path}: not a usable TFLite model: {exc}") from None
    if len(graph.inputs) != 1:
        raise EdgecamError(f"{path}: has {len(graph.inputs)} inputs; an image classifier has one")
    try:
        input_layout(graph)
    except ValueError as exc:
        raise EdgecamError(f"{path}: {exc}") from None
    try:
        head = head_from_names(graph, names.feature, names.weights, names.bias) if names else find_head(graph)
    except HeadNotFound as exc:
        raise EdgecamError(f"{path}: {exc}") from None
    return graph, head


def prepare(data: bytes, head: Head) -> tuple[bytes, list[str]]:
    """The model as edgecam runs it: repaired where an old converter wrote what the interpreter
    refuses, with the feature map and the logits added to its outputs; and what was repaired."""
    repaired, fixed = repair_quantized_dimensions(data)
    notes = [f"{len(fixed)} tensors' quantized_dimension was past their rank (an old converter's); set to 0"]
    return with_outputs(repaired, [head.feature, head.logits]), notes if fixed else []


class Classifier:
    """Loads, validates and runs one model. Not thread-safe: one per inference thread."""

    def __init__(
        self,
        path: Path,
        labels_path: Path | None = None,
        num_threads: int = 2,
        name: str | None = None,
        head_names: HeadNames | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        """`normalization`: the one stated by a flag, the config or the manifest; without it the
        model's metadata says, else a quantized input takes raw pixels and a float one the default
        (with a warning in self.warnings)."""
        self.path = Path(path)
        self.name = name or self.path.stem
        data = read_model(self.path)
        self.graph, self.head = analyse(self.path, data, head_names)
        self.metadata: ModelMetadata = read_metadata(data)
        self.warnings: list[str] = []
        self.input_note = ""
        self.runtime: Runtime = get_runtime()
        prepared, self.repairs = prepare(data, self.head)
        self.prepared = prepared  # kept for resized_interpreter()
        # The graph reads constants from the copy the interpreter runs, and the file's copy goes.
        self.graph.read_from(prepared)
        del data
        self.num_threads = num_threads
        try:
            self.interpreter: Any = make_interpreter(prepared, num_threads)
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise EdgecamError(f"{self.path}: the interpreter cannot load this model: {reason}") from None
        detail = self.interpreter.get_input_details()[0]
        scale, zp = detail["quantization"]
        layout, channels = input_layout(self.graph)
        shape = [int(v) for v in detail["shape"]]
        h, w = shape[2:4] if layout == "NCHW" else shape[1:3]
        norm = self._normalization(normalization, detail["dtype"], channels)
        self.input = InputSpec(h, w, detail["dtype"], float(scale), int(zp), norm, channels, layout)
        self._input_index = detail["index"]
        if labels_path:
            labels, self.labels_source = read_labels(labels_path), str(labels_path)
        elif self.metadata.labels:
            labels, self.labels_source = self.metadata.labels, f"metadata ({self.metadata.labels_name})"
        else:
            labels, self.labels_source = None, "none (class numbers)"
        self.labels = fit_labels(labels, self.head.num_classes, self.labels_source)
        self._score_q = self.graph.tensors[self.head.output].quant
        self._logit_q = self.graph.tensors[self.head.logits].quant
        self._feature_q = self.graph.tensors[self.head.feature].quant

    def _normalization(self, stated: Normalization | None, dtype: Any, channels: int) -> Normalization | None:
        md = self.metadata
        quantized = np.issubdtype(dtype, np.integer)
        if stated is None and md.mean and md.std:
            if quantized:
                # TFLite Support feeds quantized inputs raw pixels whatever the metadata says, and
                # the metadata of such models often describes a float twin (AutoML: mean 0, std 1).
                self.input_note = "metadata normalisation ignored: a quantized input takes raw pixels"
            else:
                stated = Normalization(md.mean, md.std, "metadata")
        if stated is not None:
            for what, values in (("mean", stated.mean), ("std", stated.std)):
                if len(values) not in (1, channels):
                    raise EdgecamError(
                        f"{self.path}: input {what} has {len(values)} values, the input has {channels} "
                        f"channel{'s' if channels > 1 else ''}: give one value or one per channel"
                    )
            return stated
        if not quantized:
            self.warnings.append(
                f"float input and no normalisation stated (no metadata, manifest entry or --input-mean/"
                f"--input-std): assuming {DEFAULT_NORMALIZATION.text()}; a model trained on other inputs "
                "answers wrongly"
            )
        return None

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """[1, H, W, C] of the feature map, whatever the layout the model keeps it in."""
        shape = self.graph.tensors[self.head.feature].shape
        return (shape[0], shape[2], shape[3], shape[1]) if self.head.layout == "NCHW" else shape

    def input_info(self) -> dict[str, Any]:
        """How frames become the model's input: what inspect and explain --json report."""
        spec = self.input
        norm = spec.normalization
        info: dict[str, Any] = {
            "layout": spec.layout,
            "channels": spec.channels,
            "color": "grey" if spec.channels == 1 else "RGB",
            "normalization": {"mean": list(norm.mean), "std": list(norm.std), "source": norm.source},
            "encoding": _input_note(spec),
        }
        if self.input_note:
            info["note"] = self.input_note
        return info

    def resized_interpreter(self, shape: list[int]) -> Any:
        """A second interpreter of the same prepared model whose input is `shape` ([N, H, W, C]: a
        batch, a wider frame). Raises the runtime's RuntimeError or ValueError when the graph cannot take it."""
        it = make_interpreter(self.prepared, self.num_threads)
        if self.input.layout == "NCHW":
            shape = [shape[0], shape[3], shape[1], shape[2]]
        it.resize_tensor_input(self._input_index, shape)
        it.allocate_tensors()
        return it

    def raw_outputs(self, x: np.ndarray, interpreter: Any = None) -> dict[int, np.ndarray]:
        """One invoke(); the raw (still quantized) score, logit and feature tensors by index.

        `interpreter`: another interpreter of the same prepared model (one with a resized
        input, say) in place of the classifier's own.
        """
        it = self.interpreter if interpreter is None else interpreter
        self.set_input(it, x)
        try:
            it.invoke()
        except (RuntimeError, ValueError) as exc:
            raise EdgecamError(f"{self.path}: inference failed: {' '.join(str(exc).split())[:300]}") from None
        return {t: it.get_tensor(t) for t in {self.head.output, self.head.logits, self.head.feature}}

    def set_input(self, interpreter: Any, x: np.ndarray) -> None:
        """Hands channels-last inputs [N, H, W, C] to an interpreter of this model, in its own layout."""
        if self.input.layout == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        interpreter.set_tensor(self._input_index, x)

    def infer(self, x: np.ndarray, interpreter: Any = None) -> Inference:
        raw = self.raw_outputs(x, interpreter)
        logits = dequantized(self._logit_q, raw[self.head.logits]).reshape(-1)
        features = dequantized(self._feature_q, raw[self.head.feature])[0]
        if self.head.layout == "NCHW":
            features = np.ascontiguousarray(features.transpose(1, 2, 0))
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
            "input": {**(tensor(self.graph.inputs[0]) or {}), **self.input_info()},
            "head": {
                "pool": self.head.pool,
                "feature_layout": self.head.layout,
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
            "labels_source": self.labels_source,
            "warnings": list(self.warnings),
            "repairs": list(self.repairs),
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
    """One line: what a pixel becomes."""
    norm = spec.normalization
    what = "grey" if spec.channels == 1 else "RGB"
    if norm.source == "quantization":
        raw = "pixels" if spec.dtype == np.uint8 else "pixels - 128"
        return f"{what} {raw} as {np.dtype(spec.dtype).name} (= {norm.text()}, by the input's quantization)"
    if np.issubdtype(spec.dtype, np.integer):
        return f"{what} {norm.text()}, quantized to {np.dtype(spec.dtype).name} (scale {spec.scale:.6g}, " \
               f"zero point {spec.zero_point})"
    return f"{what} {norm.text()} as {np.dtype(spec.dtype).name}"
