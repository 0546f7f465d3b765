"""The default resize path keeps every shared model's top-1 of plain INTER_AREA on every shared
photograph, at the frame sizes cameras deliver (near ties aside: INTER_AREA's top two within 0.03)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import ALL_MODELS, IMAGES, MODELS
from test_more_models import SETUPS

from edgecam.core.model import Classifier
from edgecam.core.preprocess import resize_path, to_input

pytestmark = pytest.mark.model

SIZES = [(640, 480), (1280, 720), (1920, 1080)]
PHOTOS = sorted(p for p in IMAGES.iterdir() if p.suffix in (".bmp", ".jpg"))
SETS = {**{n: (MODELS / f"{n}.tflite", None) for n in ALL_MODELS}, **{k: (p, n) for k, (p, _, n) in SETUPS.items()}}


@pytest.fixture(scope="module")
def frames() -> dict[tuple[int, int], list[np.ndarray]]:
    photos = [cv2.imread(str(p)) for p in PHOTOS]
    return {s: [cv2.resize(p, s, interpolation=cv2.INTER_CUBIC) for p in photos] for s in SIZES}


@pytest.mark.parametrize("key", list(SETS))
def test_default_path_keeps_the_top1_of_inter_area(frames: dict, key: str) -> None:
    path, norm = SETS[key]
    clf = Classifier(path, normalization=norm)
    for size, shots in frames.items():
        for photo, frame in zip(PHOTOS, shots, strict=True):
            ref = clf.infer(to_input(frame, clf.input, exact=True)[0]).scores
            got = clf.infer(to_input(frame, clf.input)[0]).scores
            top2 = np.sort(ref)[-2:]
            if top2[1] - top2[0] >= 0.03:
                assert int(np.argmax(got)) == int(np.argmax(ref)), (size, photo.name)


def test_resize_path_rule() -> None:
    # Small inputs always take INTER_AREA; 224 inputs take the fast path from 3x the input up.
    assert resize_path(1080, 1920, 32, 32) == "exact"
    assert resize_path(1080, 1920, 128, 128) == "exact"
    assert resize_path(480, 640, 224, 224) == "exact"
    assert resize_path(720, 1280, 224, 224) == "fast"
    assert resize_path(1080, 1920, 224, 224) == "fast"
    frame = np.zeros((720, 1280, 3), np.uint8)
    clf_spec = Classifier(MODELS / f"{ALL_MODELS[0]}.tflite").input
    keep: dict = {}
    to_input(frame, clf_spec, keep=keep)
    assert keep["resize"] == "fast"
    # The choice is made on the part of the frame the model sees: a 600x600 centre is under 3x of 224.
    to_input(np.zeros((600, 1280, 3), np.uint8), clf_spec, crop=True, keep=keep)
    assert keep["resize"] == "exact"
