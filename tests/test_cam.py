"""The CAM identity, Grad-CAM equivalence and the pictures, on the real models."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import ALL_MODELS, IMAGES, LABELS, MODELS

from edgecam.core import cam as cam_math
from edgecam.core.explain import explain_frame
from edgecam.core.model import Classifier
from edgecam.core.preprocess import InputSpec, crop_box, resize_area_fast, to_input
from edgecam.core.render import heatmap, overlay

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def classifiers() -> dict[str, Classifier]:
    return {name: Classifier(MODELS / f"{name}.tflite", LABELS) for name in ALL_MODELS}


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("image", ["cat.bmp", "grace_hopper.bmp", "parrot.jpg", "hot_dog.jpg"])
def test_cam_mean_plus_bias_is_the_logit(classifiers: dict[str, Classifier], name: str, image: str) -> None:
    """mean_yx CAM_c + b_c == logit_c for every class, within one step of the logit tensor's quantization."""
    clf = classifiers[name]
    x, _ = to_input(cv2.imread(str(IMAGES / image)), clf.input)
    inf = clf.infer(x)
    maps = clf.cams(inf, list(range(clf.num_classes)))
    assert maps.shape == (clf.num_classes, *clf.feature_shape[1:3])
    step = float(clf.graph.tensors[clf.head.logits].quant.scale[0])
    err = np.abs(maps.mean(axis=(1, 2)) + clf.head.bias - inf.logits)
    assert err.max() <= step, f"max error {err.max():.4f} > logit step {step:.4f}"
    # Not vacuous: the logits spread over many steps, and a wrong map (another class's) fails.
    assert np.ptp(inf.logits) > 20 * step
    top = int(np.argmax(inf.logits))
    assert abs(maps[(top + 1) % clf.num_classes].mean() + clf.head.bias[top] - inf.logits[top]) > step


def test_grad_cam_is_cam_after_relu(classifiers: dict[str, Classifier]) -> None:
    """Grad-CAM computed from the head's gradient (finite differences through GAP + linear) equals
    ReLU(CAM) / (H * W)."""
    clf = classifiers["tf2_mobilenet_v2_1.0_224_ptq"]
    x, _ = to_input(cv2.imread(str(IMAGES / "cat.bmp")), clf.input)
    inf = clf.infer(x)
    feats = inf.features.astype(np.float64)
    h, w, c = feats.shape
    cls = int(np.argmax(inf.scores))
    wc, bc = clf.head.weights[cls].astype(np.float64), float(clf.head.bias[cls])

    def logit(a: np.ndarray) -> float:
        return float(a.mean(axis=(0, 1)) @ wc + bc)

    # d logit / d A_k(y, x), at a few positions and channels, numerically.
    eps = 1e-3
    grads = np.empty((3, c))
    for i, (yy, xx) in enumerate([(0, 0), (3, 4), (h - 1, w - 1)]):
        for k in range(c):
            bumped = feats.copy()
            bumped[yy, xx, k] += eps
            grads[i, k] = (logit(bumped) - logit(feats)) / eps
    alpha = grads.mean(axis=0)  # Grad-CAM: the spatial mean of the gradient
    np.testing.assert_allclose(alpha, cam_math.grad_cam_weights(clf.head.weights[cls], h, w), rtol=1e-3, atol=1e-9)
    grad_cam = np.maximum(np.tensordot(feats, alpha, axes=([2], [0])), 0)
    cam = cam_math.class_maps(inf.features, clf.head.weights, [cls])[0]
    np.testing.assert_allclose(grad_cam, np.maximum(cam, 0) / (h * w), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(
        cam_math.grad_cam(inf.features, clf.head.weights, [cls])[0], grad_cam, rtol=1e-3, atol=1e-6
    )


def _peak(cam: np.ndarray, width: int, height: int) -> tuple[float, float]:
    heat = heatmap(cam, width, height)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return x / width, y / height


def test_heat_is_on_the_object(classifiers: dict[str, Classifier]) -> None:
    clf = classifiers["tf2_mobilenet_v2_1.0_224_ptq"]
    # Grace Hopper: the "military uniform" evidence is on the uniform, below her face.
    frame = cv2.imread(str(IMAGES / "grace_hopper.bmp"))
    exp = explain_frame(clf, frame)
    assert exp.top[0][1] == "military uniform"
    px, py = _peak(exp.cams[0], frame.shape[1], frame.shape[0])
    assert py > 0.5, f"uniform peak at y={py:.2f}, expected in the lower half"
    # The cat fills the middle of cat.bmp; the striped cushion sits at the top left.
    frame = cv2.imread(str(IMAGES / "cat.bmp"))
    exp = explain_frame(clf, frame)
    px, py = _peak(exp.cams[0], frame.shape[1], frame.shape[0])
    assert 0.2 < px < 0.8 and py < 0.7, (px, py)
    assert not (px < 0.25 and py < 0.25)


def test_explain_frame_orders_top_k_and_extra_classes(classifiers: dict[str, Classifier]) -> None:
    clf = classifiers["tf2_mobilenet_v2_1.0_224_ptq"]
    exp = explain_frame(clf, cv2.imread(str(IMAGES / "cat.bmp")), top_k=5, extra=[282, 286])
    scores = [s for _, _, s in exp.top]
    assert scores == sorted(scores, reverse=True) and len(scores) == 5
    assert exp.cam_ids == [286, 282]  # top-1 (Egyptian cat) first, not repeated
    assert exp.cams.shape == (2, 7, 7)


def test_overlays_have_the_frame_size_and_differ(classifiers: dict[str, Classifier]) -> None:
    clf = classifiers["tf2_mobilenet_v2_1.0_224_ptq"]
    frame = cv2.imread(str(IMAGES / "cat_720p.jpg"))
    exp = explain_frame(clf, frame)
    blend = overlay(frame, exp.cams[0], "blend")
    dim = overlay(frame, exp.cams[0], "dim")
    assert blend.shape == dim.shape == frame.shape
    assert not np.array_equal(blend, dim) and not np.array_equal(blend, frame)
    # dim: cold parts of the map show only the dimmed grey frame (all channels equal).
    heat = heatmap(exp.cams[0], frame.shape[1], frame.shape[0])
    cold = heat < 0.1
    assert cold.any()
    px = dim[cold]
    assert np.all(px[:, 0] == px[:, 1]) and np.all(px[:, 1] == px[:, 2])


def test_centre_crop_box_and_overlay_region() -> None:
    assert crop_box(720, 1280, 224, 224, crop=True) == (280, 0, 1000, 720)
    assert crop_box(720, 1280, 224, 224, crop=False) == (0, 0, 1280, 720)
    assert crop_box(600, 512, 224, 224, crop=True) == (0, 44, 512, 556)
    frame = np.full((720, 1280, 3), 100, np.uint8)
    out = overlay(frame, np.arange(49, dtype=np.float32).reshape(7, 7), "blend", (280, 0, 1000, 720))
    assert np.array_equal(out[:, :280], frame[:, :280]) and not np.array_equal(out[:, 280:1000], frame[:, 280:1000])


def test_preprocessing_dtypes() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[..., 2] = 255  # red in BGR
    x8, _ = to_input(frame, InputSpec(32, 32, np.uint8))
    assert x8.shape == (1, 32, 32, 3) and x8.dtype == np.uint8 and (x8[0, ..., 0] == 255).all()
    xi8, _ = to_input(frame, InputSpec(32, 32, np.int8))
    assert xi8.dtype == np.int8 and (xi8[0, ..., 0] == 127).all() and (xi8[0, ..., 1] == -128).all()
    xf, _ = to_input(frame, InputSpec(32, 32, np.float32))
    assert xf.dtype == np.float32 and np.allclose(xf[0, ..., 0], 1.0) and np.allclose(xf[0, ..., 1], -1.0)


def test_fast_resize_is_close_to_area() -> None:
    frame = cv2.imread(str(IMAGES / "cat_720p.jpg"))
    fast = resize_area_fast(frame, 224, 224).astype(np.float32)
    area = cv2.resize(frame, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(fast - area).mean() < 3.0
