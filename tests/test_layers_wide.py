"""`edgecam layers` and the aspect-preserving (wide) CAM, on the shared models and images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, IMAGES, LABELS, MODELS, one_error_line, run_cli

from edgecam.core.explain import explain_frame
from edgecam.core.layers import stages
from edgecam.core.methods import make
from edgecam.core.methods.wide import wide_size
from edgecam.core.model import Classifier

pytestmark = pytest.mark.model


def test_layers_one_panel_per_stage_with_the_right_shapes(model_cache: Path, tmp_path: Path) -> None:
    proc = run_cli("layers", "--json", "--out", tmp_path, IMAGES / "parrot.jpg")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    shapes = [tuple(s["shape"]) for s in out["stages"]]
    # MobileNetV2 at 224: one stage per spatial size, from edges to objects, ending with the CAM's map.
    assert [s[1:3] for s in shapes] == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert shapes[-1] == (1, 7, 7, 1280)
    assert all(s["name"].startswith("MobileNetV2/") and ";" not in s["name"] for s in out["stages"])
    picture = cv2.imread(out["picture"])
    frame = cv2.imread(str(IMAGES / "parrot.jpg"))
    panel_h = round(320 * frame.shape[0] / frame.shape[1])
    # The frame and five stages: two rows of three panels.
    assert picture.shape[:2] == (2 * panel_h, 3 * 320)


def test_layers_of_another_architecture() -> None:
    clf = Classifier(MODELS / "mobilenet_v1_0.25_128_quant.tflite", LABELS)
    found = stages(clf)
    assert [s.shape[1] for s in found] == [64, 32, 16, 8, 4]
    assert found[-1].index == clf.head.feature


def test_layers_bad_image_is_one_line(model_cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"nope")
    proc = run_cli("layers", bad)
    assert proc.returncode == 2
    one_error_line(proc, "x.jpg", "cannot read")


@pytest.mark.parametrize("flag", [("--channels", "8"), ("--workers", "2")])
def test_layers_class_options_without_class_are_one_line(model_cache: Path, tmp_path: Path, flag: tuple) -> None:
    # They shape the class maps only: without --class they were silently ignored (exit 0).
    proc = run_cli("layers", IMAGES / "cat.bmp", *flag, "--out", tmp_path)
    assert proc.returncode == 2
    one_error_line(proc, flag[0], "only with --class")
    assert not list(tmp_path.iterdir())


def test_wide_size() -> None:
    assert wide_size(720, 1280, 224) == (224, 398)
    assert wide_size(1280, 720, 224) == (398, 224)
    assert wide_size(480, 480, 224) == (224, 224)


def test_wide_cam_is_7x13_for_16_9_and_keeps_the_logit_identity() -> None:
    clf = Classifier(DEFAULT_MODEL, LABELS)
    wide = make("wide")
    exp = explain_frame(clf, cv2.imread(str(IMAGES / "cat_720p.jpg")), 3, method=wide)
    if os.environ.get("EDGECAM_RUNTIME") == "tflite" and wide.reason:
        pytest.skip(f"tflite-runtime: {wide.reason}")
    assert wide.reason == ""
    assert exp.cams.shape == (1, 7, 13)
    assert exp.top[0][1] == "Egyptian cat"
    # mean(CAM) + bias is the logit the wide inference computed: the map explains that score.
    it = wide.interpreters[(224, 398)]
    from edgecam.core.model import dequantized

    t = clf.graph.tensors[clf.head.logits]
    logit = dequantized(t.quant, it.get_tensor(clf.head.logits)).reshape(-1)[exp.cam_ids[0]]
    assert abs(exp.cams[0].mean() + clf.head.bias[exp.cam_ids[0]] - logit) <= float(t.quant.scale[0])


def test_wide_falls_back_for_a_fixed_pooling_window(model_cache: Path) -> None:
    proc = run_cli("explain", "--wide", "--json", "--model", "mobilenet_v2_1.0_224_quant", IMAGES / "cat_720p.jpg")
    assert proc.returncode == 0, proc.stderr
    assert "AVERAGE_POOL_2D" in proc.stderr and "square input" in proc.stderr
    assert np.array(json.loads(proc.stdout)["cams"][0]["map"]).shape == (7, 7)
    both = run_cli("explain", "--wide", "--crop", IMAGES / "cat_720p.jpg")
    assert both.returncode == 2
    one_error_line(both, "--wide", "--crop")
