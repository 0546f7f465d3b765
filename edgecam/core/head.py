"""Finds a CAM-able classifier head in a TFLite graph, by structure alone.

A head is a 4-D feature map feeding a global average pool (MEAN over H and W,
or an AVERAGE_POOL_2D whose window covers the map), possibly reshaped, feeding
a linear layer (FULLY_CONNECTED or a 1x1 CONV_2D) whose output reaches a model
output through shape and (de)quantization ops and an optional softmax. The map
may be channels-first (a MEAN over axes 2 and 3, as PyTorch conversions pool).
A SqueezeNet-style head, where a softmax over the pooled map gives the class
scores, is accepted too: its weights are the identity. A pooled map that is the
model's output with nothing after it is an embedding, not class scores, and is
refused; so is a linear layer with a fused activation, whose scores are no
longer a linear function of the map (the CAM identity would not hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecam.core.tflite_graph import Graph, Operator, Quantization

# Ops that only move, retype or requantize values: the head may pass through them.
_PASS_THROUGH = {"RESHAPE", "SQUEEZE", "QUANTIZE", "DEQUANTIZE"}
_SCORE_OPS = _PASS_THROUGH | {"SOFTMAX"}
# A pooled [1, 1, 1, C] tensor keeps its values in order under any transpose.
_POOLED_OPS = _PASS_THROUGH | {"TRANSPOSE"}
# ActivationFunctionType (schema.fbs).
_ACTIVATIONS = {1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


class HeadNotFound(ValueError):
    """The graph has no global-average-pool + linear classifier head."""


class ClassWeights:
    """The classifier's weights [num_classes, C], read where the model stores them (int8, fp16 or float32).

    A frame's CAM needs the rows of a few classes, so rows are read and dequantized when asked for
    (`weights[classes]`), with the same arithmetic as the whole matrix would be: a row is
    bit-identical either way. Dequantized whole, 1001 x 1280 weights are 5 MB of float32 that
    a Raspberry Pi Zero (512 MB for everything) would hold for nothing; read from the graph, they
    cost nothing beyond the model the interpreter holds anyway, and follow Graph.read_from.
    `np.asarray(weights)` gives the whole float32 matrix, for offline work that wants it.
    """

    def __init__(self, graph: Graph | None, tensor: int = -1, channels: int = 0) -> None:
        """The constant `tensor` of `graph` (a tensor that holds the values, not a DEQUANTIZE of
        them): [num_classes, ...], a 1x1 kernel [classes, 1, 1, C] as stored. graph None: the
        identity of `channels` classes (a SqueezeNet-style head: the pooled channels are the scores)."""
        self._graph, self._tensor = graph, tensor
        if graph is None:
            self.shape = self.stored_shape = (channels, channels)
            self._quant = None
            return
        t = graph.tensors[tensor]
        self.stored_shape = tuple(int(d) for d in t.shape)
        rows = self.stored_shape[0] if self.stored_shape else 0
        self.shape = (rows, int(np.prod(self.stored_shape)) // max(rows, 1))
        self._quant = t.quant if t.quant.quantized else None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, classes: int | list[int] | np.ndarray) -> np.ndarray:
        """float32 rows: [C] for one class, [n, C] for a list or array of them."""
        idx = np.asarray(classes, dtype=np.intp)
        rows = self.rows(idx.reshape(-1))
        return rows[0] if idx.ndim == 0 else rows.reshape(*idx.shape, self.shape[1])

    def rows(self, classes: np.ndarray) -> np.ndarray:
        """float32 [len(classes), C] for a 1-D array of class indices."""
        n, c = len(classes), self.shape[1]
        if self._graph is None:
            rows = np.zeros((n, c), np.float32)
            rows[np.arange(n), classes] = 1.0
            return rows
        stored = self._graph.constant(self._tensor, copy=False)
        assert stored is not None  # checked by class_weights()
        picked = stored[classes]
        q = self._quant
        if q is None:
            return picked.astype(np.float32).reshape(n, c)
        if q.scale.size > 1 and (q.axis == 0 or q.axis >= stored.ndim):
            # One scale per class (an axis past the rank means the only one there is): the rows' own.
            q = Quantization(q.scale[classes], q.zero_point[classes], 0)
        return q.dequantize(picked).reshape(n, c)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self.rows(np.arange(self.shape[0], dtype=np.intp))
        return whole if dtype is None else whole.astype(dtype)


@dataclass(frozen=True)
class Head:
    feature: int  # tensor index of the [1, H, W, C] feature map
    logits: int  # tensor index of the linear layer's output (pre-softmax)
    output: int  # the model output the logits reach
    pool: str  # "MEAN" or "AVERAGE_POOL_2D"
    linear: str  # "FULLY_CONNECTED", "CONV_2D", or "NONE" (SqueezeNet-style)
    softmax: bool  # whether the model output is already a softmax
    weights: ClassWeights  # [num_classes, C], rows dequantized when asked for
    bias: np.ndarray  # float32 [num_classes]
    weights_tensor: int | None
    bias_tensor: int | None
    layout: str = "NHWC"  # of the feature map: "NCHW" when it is pooled over axes 2 and 3

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])


def _sole_consumer(graph: Graph, tensor: int) -> Operator | None:
    users = graph.consumers(tensor)
    return users[0] if len(users) == 1 else None


def _follow(graph: Graph, tensor: int, allowed: set[str]) -> tuple[int, list[str]]:
    """Walk forward through single-consumer ops in `allowed`; returns the last tensor and ops seen."""
    seen: list[str] = []
    while tensor not in graph.outputs:
        op = _sole_consumer(graph, tensor)
        if op is None or op.op not in allowed or op.inputs[0] != tensor:
            break
        if op.op == "TRANSPOSE" and sum(d != 1 for d in graph.tensors[tensor].shape) > 1:
            break
        seen.append(op.op)
        tensor = op.outputs[0]
    return tensor, seen


def const_source(graph: Graph, tensor: int) -> int | None:
    """The tensor that stores a constant's values: itself, or what a DEQUANTIZE (fp16 or int8 weights)
    reads them from; None when the tensor is computed."""
    if graph.constant(tensor, copy=False) is not None:
        return tensor
    producer = graph.producer(tensor)
    if producer is not None and producer.op == "DEQUANTIZE":
        return const_source(graph, producer.inputs[0])
    return None


def const_value(graph: Graph, tensor: int) -> np.ndarray | None:
    """Real value (float32) of a constant tensor, looking through a DEQUANTIZE."""
    source = const_source(graph, tensor)
    raw = None if source is None else graph.constant(source)
    if raw is None:
        return None
    quant = graph.tensors[source].quant  # type: ignore[index]
    return quant.dequantize(raw) if quant.quantized else raw.astype(np.float32)


def class_weights(graph: Graph, tensor: int) -> ClassWeights | None:
    """A linear layer's constant weights [classes, ...], read from the model when used; None when
    they are computed."""
    source = const_source(graph, tensor)
    return None if source is None else ClassWeights(graph, source)


def _global_pool_layout(graph: Graph, op: Operator) -> str | None:
    """The feature map's layout if `op` averages all of it over space, else None."""
    shape = graph.tensors[op.inputs[0]].shape
    if len(shape) != 4:
        return None
    if op.op == "MEAN":
        axes = graph.constant(op.inputs[1]) if len(op.inputs) > 1 else None
        spatial = {int(a) % 4 for a in np.ravel(axes)} if axes is not None else set()
        return {frozenset({1, 2}): "NHWC", frozenset({2, 3}): "NCHW"}.get(frozenset(spatial))
    if op.op == "AVERAGE_POOL_2D":
        o = op.options
        if o.get("filter_height") == shape[1] and o.get("filter_width") == shape[2] and o.get("activation", 0) == 0:
            return "NHWC"
    return None


def _linear_params(
    graph: Graph, op: Operator, channels: int
) -> tuple[ClassWeights, np.ndarray] | str:
    """Weights [classes, C] and bias of a linear layer over the pooled channels, or why it is not one."""
    if op.op not in ("FULLY_CONNECTED", "CONV_2D") or len(op.inputs) < 2:
        return f"the pooled map feeds {op.op}, not a FULLY_CONNECTED or 1x1 CONV_2D classifier"
    activation = op.options.get("activation", 0)
    if activation != 0:
        name = _ACTIVATIONS.get(activation, f"activation {activation}")
        return (f"the {op.op} after the pool has a fused {name}: its scores are not a linear function of "
                "the feature map, so a CAM would not add up to them")
    weights = class_weights(graph, op.inputs[1])
    if weights is None:
        return f"the {op.op} after the pool has no constant weights"
    stored = weights.stored_shape
    if op.op == "CONV_2D" and (len(stored) != 4 or stored[1:3] != (1, 1)):
        if len(stored) != 4:
            return f"the CONV_2D after the pool has {len(stored)}-D weights, not a 1x1 kernel"
        return f"the CONV_2D after the pool has a {stored[1]}x{stored[2]} kernel, not 1x1"
    if (op.op == "FULLY_CONNECTED" and len(stored) != 2) or weights.shape[1] != channels:
        return f"the {op.op} after the pool takes {stored[-1]} inputs, the pool gives {channels}"
    bias = None
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias = const_value(graph, op.inputs[2])
    if bias is None:
        bias = np.zeros(weights.shape[0], np.float32)
    return weights, np.ravel(bias).astype(np.float32)


def find_head(graph: Graph) -> Head:
    """The classifier head of the model, or HeadNotFound saying what was looked for (and, where a
    global pool was found, why what follows it is not a classifier)."""
    candidates: list[Head] = []
    reasons: list[str] = []
    for pool in graph.operators:
        layout = _global_pool_layout(graph, pool) if pool.op in ("MEAN", "AVERAGE_POOL_2D") else None
        if layout is None:
            continue
        feature = pool.inputs[0]
        channels = graph.tensors[feature].shape[3 if layout == "NHWC" else 1]
        pooled, _ = _follow(graph, pool.outputs[0], _POOLED_OPS)
        linear = _sole_consumer(graph, pooled)
        params = _linear_params(graph, linear, channels) if linear is not None else None
        if linear is not None and linear.inputs[0] == pooled and isinstance(params, tuple):
            logits = linear.outputs[0]
            weights, bias = params
            kind = linear.op
            wt, bt = linear.inputs[1], (linear.inputs[2] if len(linear.inputs) > 2 and linear.inputs[2] >= 0 else None)
        elif isinstance(params, str) and linear is not None and linear.op in ("FULLY_CONNECTED", "CONV_2D"):
            # Worth saying only when this is the head's place: the layer's output is the model's.
            # A pool inside the network (squeeze-excite, a segmentation model's context branch) is not.
            if _follow(graph, linear.outputs[0], _SCORE_OPS)[0] in graph.outputs:
                reasons.append(params)
            continue
        else:
            # SqueezeNet-style: the pooled channels are the class scores.
            logits, kind = pool.outputs[0], "NONE"
            weights, bias = ClassWeights(None, channels=channels), np.zeros(channels, np.float32)
            wt = bt = None
        end, ops = _follow(graph, logits, _SCORE_OPS)
        if end not in graph.outputs:
            continue
        if kind == "NONE" and "SOFTMAX" not in ops:
            reasons.append(
                f"the model's output is the pooled feature map itself ({channels} values from {pool.op}) with "
                "no classifier layer or softmax after it: an embedding (feature extractor), not class scores"
            )
            continue
        candidates.append(
            Head(feature, logits, end, pool.op, kind, "SOFTMAX" in ops, weights, bias, wt, bt, layout)
        )
    if not candidates:
        if reasons:
            # The last global pool in the graph is the head's, if any is (earlier ones: squeeze-excite blocks).
            raise HeadNotFound(f"not a classifier edgecam can explain: {reasons[-1]}")
        raise HeadNotFound(
            "no classifier head found: expected a 4-D feature map -> global average pool "
            "(MEAN over H,W or AVERAGE_POOL_2D over the whole map) -> FULLY_CONNECTED or 1x1 CONV_2D "
            "-> model output"
        )
    candidates.sort(key=lambda h: graph.outputs.index(h.output))
    return candidates[0]


def head_from_names(graph: Graph, feature: str, weights: str, bias: str | None = None) -> Head:
    """A head named explicitly (config), for graphs the search does not understand."""
    by_name = {t.name: t.index for t in graph.tensors}
    for what, name in (("feature tensor", feature), ("classifier weights", weights), ("classifier bias", bias)):
        if name is not None and name not in by_name:
            raise HeadNotFound(f"{what} {name!r} is not a tensor of this model")
    f = by_name[feature]
    fshape = graph.tensors[f].shape
    if len(fshape) != 4:
        raise HeadNotFound(f"feature tensor {feature!r} has shape {list(fshape)}, expected [1, H, W, C]")
    w_idx = by_name[weights]
    w = class_weights(graph, w_idx)
    if w is None:
        raise HeadNotFound(f"classifier weights {weights!r} are not a constant tensor")
    if w.shape[1] != fshape[3]:
        raise HeadNotFound(
            f"classifier weights {weights!r} have {w.shape[1]} inputs, the feature map has {fshape[3]} channels"
        )
    b = np.zeros(w.shape[0], np.float32)
    b_idx = by_name[bias] if bias else None
    if b_idx is not None:
        bv = const_value(graph, b_idx)
        if bv is None or bv.size != w.shape[0]:
            raise HeadNotFound(f"classifier bias {bias!r} is not a constant of {w.shape[0]} values")
        b = np.ravel(bv).astype(np.float32)
    linear = next((op for op in graph.consumers(w_idx)), None)
    if linear is None:
        raise HeadNotFound(f"classifier weights {weights!r} feed no operator")
    logits = linear.outputs[0]
    end, ops = _follow(graph, logits, _SCORE_OPS)
    output = end if end in graph.outputs else graph.outputs[0]
    return Head(f, logits, output, "named", linear.op, "SOFTMAX" in ops, w, b, w_idx, b_idx)
