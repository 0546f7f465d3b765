"""Contract v1 result payloads: the compressed heatmap round trip and the JSON shape."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import IMAGES, LABELS, MODELS

from edgecam.contract import PayloadError, decode_cam, encode_cam, iso_ms, result_payload
from edgecam.core.explain import explain_frame
from edgecam.core.model import Classifier


def test_cam_round_trip_within_one_png_step() -> None:
    rng = np.random.default_rng(1)
    cam = rng.normal(0, 3, (7, 13)).astype(np.float32)
    obj = encode_cam(cam)
    back = decode_cam(obj)
    assert back.shape == (7, 13) and (obj["w"], obj["h"]) == (13, 7)
    step = (cam.max() - cam.min()) / 255
    assert np.abs(back - cam).max() <= step / 2 + 1e-5


def test_flat_cam_decodes_flat() -> None:
    back = decode_cam(encode_cam(np.full((7, 7), 2.5, np.float32)))
    assert np.allclose(back, 2.5)


@pytest.mark.parametrize(
    "obj",
    [
        {"w": 7, "h": 7, "min": 0, "max": 1, "png": "not base64!"},
        {"w": 7, "h": 7, "min": 0, "max": 1},
        {"w": 9, "h": 7, "min": 0, "max": 1, "png": encode_cam(np.zeros((7, 7)))["png"]},
    ],
)
def test_bad_cam_objects_are_refused(obj: dict) -> None:
    with pytest.raises(PayloadError):
        decode_cam(obj)


@pytest.mark.model
def test_result_payload_of_a_real_frame_is_small_and_decodes() -> None:
    clf = Classifier(MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite", LABELS)
    exp = explain_frame(clf, cv2.imread(str(IMAGES / "cat_720p.jpg")))
    data = result_payload(
        device="pi-kitchen",
        boot="3f2a9c1e",
        seq=12,
        ts=1_764_156_857.123,
        model=clf.name,
        top=exp.top,
        cam_id=exp.cam_ids[0],
        cam_label=clf.labels[exp.cam_ids[0]],
        cam=exp.cams[0],
        timing_ms={"capture_age": 3.2, "pre": 0.4, "infer": 1.9, "cam": 0.1, "total": 2.5},
    )
    assert len(data) < 1024, len(data)
    obj = json.loads(data)
    assert obj["v"] == 1 and obj["seq"] == 12 and obj["ts"] == iso_ms(1_764_156_857.123)
    assert obj["ts"].endswith(".123Z")
    assert obj["top"][0]["label"] == "Egyptian cat"
    step = (exp.cams[0].max() - exp.cams[0].min()) / 255
    assert np.abs(decode_cam(obj["cam"]) - exp.cams[0]).max() <= step
