"""The head search on small models built here, one for each shape it claims to accept or refuse,
each run by the real TFLite interpreter: accepted heads must satisfy the CAM identity, refused
ones must say why in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tflite_builder import RELU, Model, build

from edgecam.core.errors import EdgecamError
from edgecam.core.model import Classifier
from edgecam.core.runtime import get_runtime

CLASSES, K = 5, 8  # classes, feature channels
RNG = np.random.default_rng(7)
CONV_W = RNG.normal(0, 0.5, (K, 3, 3, 3)).astype(np.float32)
CONV_W1 = RNG.normal(0, 0.5, (K, 3, 3, 1)).astype(np.float32)
CONV_B = RNG.normal(0, 0.1, K).astype(np.float32)
FC_W = RNG.normal(0, 1.0, (CLASSES, K)).astype(np.float32)
FC_B = RNG.normal(0, 0.5, CLASSES).astype(np.float32)


def backbone(m: Model, channels: int = 3, nchw_input: bool = False) -> int:
    """Input [1, 16, 16, C] (or [1, C, 16, 16] and a TRANSPOSE) -> 3x3 conv, stride 2, ReLU -> [1, 8, 8, K]."""
    shape = (1, channels, 16, 16) if nchw_input else (1, 16, 16, channels)
    x = m.tensor(shape, name="input")
    m.inputs = [x]
    if nchw_input:
        x = m.op("TRANSPOSE", [x, m.const(np.array([0, 2, 3, 1], np.int32))], (1, 16, 16, channels))
    w = CONV_W if channels == 3 else CONV_W1
    return m.op("CONV_2D", [x, m.const(w), m.const(CONV_B)], (1, 8, 8, K), name="features", stride=2,
                activation=RELU)


def mean(m: Model, f: int, keep: bool = False) -> int:
    return m.op("MEAN", [f, m.const(np.array([1, 2], np.int32))], (1, 1, 1, K) if keep else (1, K), keep_dims=keep)


def fc(m: Model, x: int, activation: int = 0, weights: int | None = None) -> int:
    w = m.const(FC_W) if weights is None else weights
    return m.op("FULLY_CONNECTED", [x, w, m.const(FC_B)], (1, CLASSES), name="logits", activation=activation)


def finish(m: Model, out: int) -> Model:
    m.outputs = [out]
    return m


def softmax(m: Model, x: int) -> int:
    return m.op("SOFTMAX", [x], (1, CLASSES), name="scores")


# --- accepted shapes --------------------------------------------------------------------------

def mean_fc_softmax() -> Model:
    m = Model()
    return finish(m, softmax(m, fc(m, mean(m, backbone(m)))))


def mean_fc_logits() -> Model:
    m = Model()
    return finish(m, fc(m, mean(m, backbone(m))))


def avgpool_reshape_fc() -> Model:
    m = Model()
    p = m.op("AVERAGE_POOL_2D", [backbone(m)], (1, 1, 1, K), filter=(8, 8))
    r = m.op("RESHAPE", [p, m.const(np.array([1, K], np.int32))], (1, K), shape=[1, K])
    return finish(m, softmax(m, fc(m, r)))


def avgpool_conv1x1_squeeze() -> Model:
    m = Model()
    p = m.op("AVERAGE_POOL_2D", [backbone(m)], (1, 1, 1, K), filter=(8, 8))
    c = m.op("CONV_2D", [p, m.const(FC_W.reshape(CLASSES, 1, 1, K)), m.const(FC_B)], (1, 1, 1, CLASSES),
             name="logits")
    s = m.op("SQUEEZE", [c], (1, CLASSES), dims=[1, 2])
    return finish(m, softmax(m, s))


def mean_keepdims_transpose_reshape_fc() -> Model:
    """A pooled [1, 1, 1, K] moved to [1, K, 1, 1] (as converters of channels-first graphs do) and flattened."""
    m = Model()
    p = mean(m, backbone(m), keep=True)
    t = m.op("TRANSPOSE", [p, m.const(np.array([0, 3, 1, 2], np.int32))], (1, K, 1, 1))
    r = m.op("RESHAPE", [t, m.const(np.array([1, K], np.int32))], (1, K), shape=[1, K])
    return finish(m, softmax(m, fc(m, r)))


def fp16_weights_quantize_dequantize_tail() -> Model:
    """Float16 weights behind a DEQUANTIZE (TFLite's fp16 models), and an int8 round trip before the softmax."""
    m = Model()
    w = m.op("DEQUANTIZE", [m.const(FC_W.astype(np.float16))], (CLASSES, K))
    logits = fc(m, mean(m, backbone(m)), weights=w)
    q = m.op("QUANTIZE", [logits], (1, CLASSES), np.int8)
    m.tensors[q].scale, m.tensors[q].zero_point = 0.05, 0
    d = m.op("DEQUANTIZE", [q], (1, CLASSES))
    return finish(m, softmax(m, d))


def nchw_feature_map() -> Model:
    """The feature map kept channels-first and pooled over axes 2 and 3, as PyTorch exports do."""
    m = Model()
    t = m.op("TRANSPOSE", [backbone(m), m.const(np.array([0, 3, 1, 2], np.int32))], (1, K, 8, 8))
    p = m.op("MEAN", [t, m.const(np.array([2, 3], np.int32))], (1, K))
    return finish(m, softmax(m, fc(m, p)))


def nchw_input_mean_reshape_fc() -> Model:
    """Channels-first input -> TRANSPOSE -> ... -> MEAN -> RESHAPE -> FULLY_CONNECTED, no softmax."""
    m = Model()
    p = mean(m, backbone(m, nchw_input=True), keep=True)
    r = m.op("RESHAPE", [p, m.const(np.array([1, K], np.int32))], (1, K), shape=[1, K])
    return finish(m, fc(m, r))


def grey_input() -> Model:
    m = Model()
    return finish(m, softmax(m, fc(m, mean(m, backbone(m, channels=1)))))


def squeezenet() -> Model:
    """Conv classifier (1x1 conv to the classes, with its ReLU) -> global pool -> softmax."""
    m = Model()
    maps = m.op("CONV_2D", [backbone(m), m.const(FC_W.reshape(CLASSES, 1, 1, K)), m.const(FC_B)],
                (1, 8, 8, CLASSES), name="class_maps", activation=RELU)
    p = m.op("MEAN", [maps, m.const(np.array([1, 2], np.int32))], (1, CLASSES))
    return finish(m, softmax(m, p))


ACCEPTED: dict[str, tuple[Callable[[], Model], dict[str, object]]] = {
    "mean_fc_softmax": (mean_fc_softmax, {"pool": "MEAN", "linear": "FULLY_CONNECTED", "softmax": True}),
    "mean_fc_logits": (mean_fc_logits, {"pool": "MEAN", "linear": "FULLY_CONNECTED", "softmax": False}),
    "avgpool_reshape_fc": (avgpool_reshape_fc, {"pool": "AVERAGE_POOL_2D", "linear": "FULLY_CONNECTED"}),
    "avgpool_conv1x1_squeeze": (avgpool_conv1x1_squeeze, {"pool": "AVERAGE_POOL_2D", "linear": "CONV_2D"}),
    "mean_keepdims_transpose_reshape_fc": (mean_keepdims_transpose_reshape_fc, {"linear": "FULLY_CONNECTED"}),
    "fp16_weights_quantize_dequantize_tail": (fp16_weights_quantize_dequantize_tail, {"softmax": True}),
    "nchw_feature_map": (nchw_feature_map, {"pool": "MEAN", "layout": "NCHW"}),
    "nchw_input_mean_reshape_fc": (nchw_input_mean_reshape_fc, {"softmax": False}),
    "grey_input": (grey_input, {"linear": "FULLY_CONNECTED"}),
    "squeezenet": (squeezenet, {"pool": "MEAN", "linear": "NONE", "softmax": True}),
}


def save(tmp_path: Path, name: str, model: Model) -> Path:
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(build(model))
    return path


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_head_satisfies_the_cam_identity(tmp_path: Path, name: str) -> None:
    make, want = ACCEPTED[name]
    clf = Classifier(save(tmp_path, name, make()), normalization=None)
    head = clf.head
    for key, value in want.items():
        assert getattr(head, key) == value, (key, getattr(head, key))
    if name == "nchw_input_mean_reshape_fc":
        assert (clf.input.layout, clf.input.channels) == ("NCHW", 3)
    if name == "grey_input":
        assert clf.input.channels == 1
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.uniform(-1, 1, (1, 16, 16, clf.input.channels)).astype(np.float32)
        inf = clf.infer(x)
        maps = clf.cams(inf, list(range(clf.num_classes)))
        assert maps.shape == (CLASSES, 8, 8)
        cam_logits = maps.mean(axis=(1, 2)) + head.bias
        np.testing.assert_allclose(cam_logits, inf.logits, rtol=1e-4, atol=1e-4)
        # The weights the search found are the model's: its own scores come out of them.
        e = np.exp(cam_logits - cam_logits.max())
        tail = 0.05 if name.startswith("fp16") else 1e-4  # the int8 round trip before the softmax
        np.testing.assert_allclose(inf.scores, e / e.sum(), atol=tail)
        assert np.ptp(inf.logits) > 0.5  # not a degenerate model


def test_channels_first_input_is_fed_transposed(tmp_path: Path) -> None:
    """The NCHW model and the same network taking NHWC give the same scores for the same picture."""
    nchw = Classifier(save(tmp_path, "a", nchw_input_mean_reshape_fc()))
    m = Model()
    p = mean(m, backbone(m), keep=True)
    r = m.op("RESHAPE", [p, m.const(np.array([1, K], np.int32))], (1, K), shape=[1, K])
    nhwc = Classifier(save(tmp_path, "b", finish(m, fc(m, r))))
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(nchw.infer(x).logits, nhwc.infer(x).logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nchw.infer(x).features, nhwc.infer(x).features, rtol=1e-5, atol=1e-5)


# --- refused shapes ---------------------------------------------------------------------------

def fused_relu_fc() -> Model:
    m = Model()
    return finish(m, softmax(m, fc(m, mean(m, backbone(m)), activation=RELU)))


def embedding() -> Model:
    m = Model()
    return finish(m, mean(m, backbone(m)))


def relu_after_logits() -> Model:
    m = Model()
    return finish(m, m.op("RELU", [fc(m, mean(m, backbone(m)))], (1, CLASSES)))


REFUSED = {
    "fused_relu_fc": (fused_relu_fc, ["fused RELU", "not a linear function"]),
    "embedding": (embedding, ["pooled feature map itself", "8 values", "embedding"]),
    "relu_after_logits": (relu_after_logits, ["no classifier head found"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_head_says_why(tmp_path: Path, name: str) -> None:
    make, needles = REFUSED[name]
    path = save(tmp_path, name, make())
    # The model itself is sound: the interpreter runs it.
    it = get_runtime().interpreter_cls(model_path=str(path))
    it.allocate_tensors()
    it.invoke()
    with pytest.raises(EdgecamError) as exc:
        Classifier(path)
    message = str(exc.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_fused_relu_breaks_the_cam_identity(tmp_path: Path) -> None:
    """Why that head is refused: with a ReLU on the logits, mean CAM + bias is no longer the logit."""
    path = save(tmp_path, "relu", fused_relu_fc())
    m = fused_relu_fc()
    feature = next(i for i, t in enumerate(m.tensors) if t.name == "features")
    logits = next(i for i, t in enumerate(m.tensors) if t.name == "logits")
    it = get_runtime().interpreter_cls(model_path=str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    misses = 0
    rng = np.random.default_rng(5)
    for _ in range(5):
        it.set_tensor(it.get_input_details()[0]["index"], rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32))
        it.invoke()
        cam_logits = it.get_tensor(feature)[0].mean(axis=(0, 1)) @ FC_W.T + FC_B
        misses += int((np.abs(cam_logits - it.get_tensor(logits)[0]) > 1e-3).sum())
    assert misses > 0
