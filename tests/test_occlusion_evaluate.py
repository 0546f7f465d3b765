"""Occlusion sensitivity and the faithfulness figures, on the shared models and images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, IMAGES, LABELS, one_error_line, run_cli

from edgecam.core.evaluate import auc, pointing
from edgecam.core.explain import explain_frame
from edgecam.core.methods import make
from edgecam.core.methods.occlusion import grey, occluded_inputs, positions
from edgecam.core.model import Classifier
from edgecam.core.preprocess import to_input
from edgecam.core.render import heatmap

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return Classifier(DEFAULT_MODEL, LABELS, num_threads=2, name=DEFAULT_MODEL.stem)


def test_positions_cover_every_pixel() -> None:
    assert positions(224, 56, 28) == [0, 28, 56, 84, 112, 140, 168]
    assert positions(224, 64, 48) == [0, 48, 96, 144, 160]  # the last flush with the edge
    assert positions(100, 200, 10) == [0]


def test_occluded_inputs_grey_out_one_patch_each(clf: Classifier) -> None:
    x, _ = to_input(cv2.imread(str(IMAGES / "cat.bmp")), clf.input)
    batch, rows, cols = occluded_inputs(x, clf.input, 56, 28)
    assert (rows, cols) == (7, 7) and batch.shape == (49, 224, 224, 3)
    g = np.asarray(grey(clf.input)).astype(x.dtype)
    # Position (2, 3): rows 56..112, columns 84..140 are grey, the rest is the picture.
    k = 2 * cols + 3
    assert np.all(batch[k, 56:112, 84:140] == g)
    outside = np.ones((224, 224), bool)
    outside[56:112, 84:140] = False
    assert np.array_equal(batch[k][outside], x[0][outside])


def _peak(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    heat = heatmap(grid, width, height)
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return np.array([x / width, y / height])


@pytest.mark.parametrize("name", ["cat.bmp", "bird.bmp", "parrot.jpg"])
def test_occlusion_and_cam_agree_on_where_the_object_is(clf: Classifier, name: str) -> None:
    frame = cv2.imread(str(IMAGES / name))
    exp = explain_frame(clf, frame, 1)
    x, _ = to_input(frame, clf.input)
    occ = make("occlusion").maps(clf, x, clf.infer(x), exp.cam_ids)
    assert occ.maps.shape == (1, 7, 7)
    # The shared MobileNetV2 refuses a batch resize: the prediction and one invoke() per position.
    assert occ.inferences == 50 and occ.how == "one invoke() each" and occ.detail == "7x7 positions"
    h, w = frame.shape[:2]
    distance = np.linalg.norm(_peak(exp.cams[0], w, h) - _peak(occ.maps[0], w, h))
    assert distance < 0.3, f"CAM and occlusion peaks {distance:.2f} of the frame apart"
    # Hiding part of the object costs score: the largest drop is well above the output's quantization
    # step (1/256); a big parrot keeps most of its score (0.94 -> 0.88) with any one patch hidden.
    assert occ.maps[0].max() > 0.02


def test_explain_with_occlusion(model_cache: Path, tmp_path: Path) -> None:
    proc = run_cli("explain", "--method", "occlusion", "--json", "--out", tmp_path, "--style", "blend",
                   IMAGES / "parrot.jpg")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["method"] == "occlusion" and obj["top"][0]["label"] == "macaw"
    assert np.array(obj["cams"][0]["map"]).shape == (7, 7)
    assert "occlusion: 7x7 positions, 50 inferences" in proc.stderr
    assert (tmp_path / "parrot.cam89.blend.jpg").exists()
    bad = run_cli("explain", "--method", "occlusion", "--patch", "0", IMAGES / "parrot.jpg")
    assert bad.returncode == 2
    one_error_line(bad, "--patch 0")


def test_auc_and_pointing() -> None:
    assert auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert auc(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)
    sal = np.zeros((10, 10), np.float32)
    sal[2, 3] = 5.0
    sal[8, 8] = 1.0
    mask = np.zeros((10, 10), bool)
    mask[1:4, 2:5] = True
    assert pointing(sal, mask) == (1.0, pytest.approx(5 / 6))
    assert pointing(sal, ~mask) == (0.0, pytest.approx(1 / 6))


def test_evaluate_ranks_cam_above_random(model_cache: Path) -> None:
    proc = run_cli("evaluate", "--json", IMAGES, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    names = {p.name for p in IMAGES.iterdir() if p.suffix in {".bmp", ".jpg"}}
    assert {s["image"] for s in out["images"]} == names
    mean = out["mean"]
    assert mean["cam"]["deletion"] < mean["random"]["deletion"]
    assert mean["cam"]["insertion"] > mean["random"]["insertion"]
    assert mean["occlusion"]["deletion"] < mean["random"]["deletion"]
    assert mean["occlusion"]["insertion"] > mean["random"]["insertion"]
    # And image by image for CAM on deletion, the clearer of the two.
    by = {(s["image"], s["method"]): s for s in out["images"]}
    assert all(by[(n, "cam")]["deletion"] < by[(n, "random")]["deletion"] for n in names)


def test_evaluate_with_masks_and_a_table(model_cache: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    # The whole frame is the object for the bird; nothing is for the parrot.
    cv2.imwrite(str(masks / "bird.png"), np.full((50, 60), 255, np.uint8))
    cv2.imwrite(str(masks / "parrot.png"), np.zeros((50, 60), np.uint8))
    proc = run_cli("evaluate", "--method", "cam", "--masks", masks, IMAGES / "bird.bmp", IMAGES / "parrot.jpg")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.endswith(("-", "0", "1"))}
    assert rows["bird.bmp"][-2:] == ["1.000", "1.000"]
    assert rows["parrot.jpg"][-2:] == ["0.000", "0.000"]
    assert "deletion: lower is better" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["--steps", "1"], ["--steps 1"]), (["--masks", "/nonexistent"], ["--masks", "not a directory"])],
)
def test_evaluate_bad_options_are_one_line(model_cache: Path, args: list[str], needles: list[str]) -> None:
    proc = run_cli("evaluate", *args, IMAGES / "bird.bmp")
    assert proc.returncode == 2
    one_error_line(proc, *needles)
