"""The flatbuffer reader and the head search, checked against the interpreter itself."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import ALL_MODELS, IMAGES, LABELS, MODELS

from edgecam.core.head import HeadNotFound, find_head, head_from_names
from edgecam.core.model import Classifier
from edgecam.core.preprocess import to_input
from edgecam.core.runtime import get_runtime
from edgecam.core.tflite_graph import GraphFormatError, parse, with_outputs

pytestmark = pytest.mark.model


def _interpreter(**kw):
    rt = get_runtime()
    it = rt.interpreter_cls(**kw)
    it.allocate_tensors()
    return it


@pytest.mark.parametrize("name", [*ALL_MODELS, "bad/deeplabv3_mnv2_dm05_pascal_quant"])
def test_reader_agrees_with_the_interpreter(name: str) -> None:
    data = (MODELS / f"{name}.tflite").read_bytes()
    graph = parse(data)
    # Before allocate_tensors(): afterwards XNNPACK's delegate node joins the op list.
    it = get_runtime().interpreter_cls(model_content=data)
    details = {d["index"]: d for d in it.get_tensor_details()}
    ops = it._get_ops_details()
    assert len(ops) == len(graph.operators)
    for theirs, ours in zip(ops, graph.operators, strict=True):
        if not ours.op.startswith("OP_"):
            assert theirs["op_name"] == ours.op
        assert list(theirs["inputs"]) == list(ours.inputs)
        assert list(theirs["outputs"]) == list(ours.outputs)
    for t in graph.tensors:
        if t.index in details:
            d = details[t.index]
            assert d["name"] == t.name
            assert tuple(d["shape"]) == t.shape
            if t.quant.quantized:
                np.testing.assert_allclose(d["quantization_parameters"]["scales"], t.quant.scale)


@pytest.mark.parametrize(
    ("name", "pool", "shape"),
    [
        ("tf2_mobilenet_v2_1.0_224_ptq", "MEAN", (1, 7, 7, 1280)),
        ("mobilenet_v2_1.0_224_quant", "AVERAGE_POOL_2D", (1, 7, 7, 1280)),
        ("mobilenet_v1_0.25_128_quant", "AVERAGE_POOL_2D", (1, 4, 4, 256)),
    ],
)
def test_head_found_by_structure(name: str, pool: str, shape: tuple[int, ...]) -> None:
    graph = parse((MODELS / f"{name}.tflite").read_bytes())
    head = find_head(graph)
    assert head.pool == pool
    assert head.linear == "CONV_2D"
    assert graph.tensors[head.feature].shape == shape
    assert head.weights.shape == (1001, shape[3])
    assert head.bias.shape == (1001,)
    assert head.softmax
    assert head.output == graph.outputs[0]


def test_segmentation_model_has_no_head() -> None:
    graph = parse((MODELS / "bad/deeplabv3_mnv2_dm05_pascal_quant.tflite").read_bytes())
    with pytest.raises(HeadNotFound, match="no classifier head"):
        find_head(graph)


def test_named_head_matches_the_search() -> None:
    graph = parse((MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes())
    found = find_head(graph)
    t = graph.tensors
    named = head_from_names(graph, t[found.feature].name, t[found.weights_tensor].name, t[found.bias_tensor].name)
    assert (named.feature, named.logits, named.output) == (found.feature, found.logits, found.output)
    np.testing.assert_array_equal(named.weights, found.weights)
    with pytest.raises(HeadNotFound, match="not a tensor"):
        head_from_names(graph, "nope", t[found.weights_tensor].name)


def test_weights_are_dequantized_per_channel() -> None:
    """The tf2 model's classifier is int8 with one scale per class: check one row by hand."""
    graph = parse((MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes())
    head = find_head(graph)
    wt = graph.tensors[head.weights_tensor]
    raw = graph.constant(head.weights_tensor).reshape(1001, -1)
    c = 286
    expected = (raw[c].astype(np.float32) - wt.quant.zero_point[c]) * wt.quant.scale[c]
    np.testing.assert_allclose(head.weights[c], expected, rtol=1e-6)
    assert wt.quant.scale.size == 1001


@pytest.mark.parametrize("blob", [b"", b"hello world, not a model", b"\0" * 4 + b"TFL3" + b"\xff" * 32])
def test_reader_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(GraphFormatError):
        parse(blob)


def test_truncated_model_is_rejected() -> None:
    data = (MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes()
    with pytest.raises(GraphFormatError, match=r"truncated|outside"):
        parse(data[:100_000])


def test_extra_outputs_keep_the_model_intact() -> None:
    data = (MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite").read_bytes()
    graph = parse(data)
    head = find_head(graph)
    out = with_outputs(data, [head.feature, head.logits])
    assert out[: len(data)][:4] == data[:4]
    g2 = parse(out)
    assert g2.outputs == (*graph.outputs, head.feature, head.logits)
    assert len(g2.operators) == len(graph.operators)
    # Idempotent: asking again for outputs that are already there changes nothing.
    assert with_outputs(out, [head.feature]) == out


@pytest.mark.parametrize("name", ALL_MODELS)
def test_exposed_feature_map_is_the_one_the_classifier_consumes(name: str) -> None:
    """The prepared model's feature output equals the tensor the unmodified model computes
    (read with the debug-only preserve-all-tensors mode, same kernels), and its scores are unchanged."""
    path = MODELS / f"{name}.tflite"
    clf = Classifier(path, LABELS)
    x, _ = to_input(cv2.imread(str(IMAGES / "cat.bmp")), clf.input)
    ours = clf.raw_outputs(x)
    ref = _interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    ref.set_tensor(ref.get_input_details()[0]["index"], x)
    ref.invoke()
    np.testing.assert_array_equal(ours[clf.head.feature], ref.get_tensor(clf.head.feature))
    np.testing.assert_array_equal(ours[clf.head.output], ref.get_tensor(ref.get_output_details()[0]["index"]))
    # The feature tensor is the pool's input and the pool feeds the linear layer that makes the logits.
    pool = clf.graph.consumers(clf.head.feature)
    assert len(pool) == 1 and pool[0].op in ("MEAN", "AVERAGE_POOL_2D")
