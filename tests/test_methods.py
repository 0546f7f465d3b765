"""The explanation methods as one family: the registry, the shared pipeline, and what each method owes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, IMAGES, LABELS, run_cli

from edgecam.core.errors import EdgecamError
from edgecam.core.explain import explain_frame
from edgecam.core.methods import COSTS, REGISTRY, Method, make, names
from edgecam.core.model import Classifier
from edgecam.device.daemon import DAEMON_METHOD


def test_registry_names_costs_and_options() -> None:
    assert {"cam", "occlusion", "wide", "random"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.cost in COSTS and cls.summary
        assert issubclass(cls, Method)
    # make() takes the options a method knows and leaves the others (a command line has them all).
    occ = make("occlusion", patch=40, stride=20, seed=3, top=5, images=["x"])
    assert (occ.patch, occ.stride) == (40, 20)
    assert make("random", seed=7, patch=40).seed == 7
    assert make("occlusion", patch=None).patch == 56  # None: the method's default
    with pytest.raises(EdgecamError, match="unknown method 'gradcam'; known: cam"):
        make("gradcam")
    # The daemon's per-frame method comes from the registry and costs no extra inference.
    assert REGISTRY[DAEMON_METHOD].cost == "frame"
    assert "wide" not in names(square_input=True)


@pytest.mark.model
def test_the_pipeline_gives_each_method_the_same_prediction() -> None:
    clf = Classifier(DEFAULT_MODEL, LABELS)
    frame = cv2.imread(str(IMAGES / "cat.bmp"))
    cam = explain_frame(clf, frame, 3, [282])
    for name in ("occlusion", "random"):
        exp = explain_frame(clf, frame, 3, [282], method=make(name))
        assert exp.top == cam.top and exp.cam_ids == cam.cam_ids == [286, 282]
        assert exp.cams.shape == cam.cams.shape == (2, 7, 7)
        assert exp.made is not None and exp.made.maps is exp.cams
    # The default is the CAM, and the same with it named.
    named = explain_frame(clf, frame, 3, [282], method=make("cam"))
    assert np.array_equal(named.cams, cam.cams) and cam.made is not None and cam.made.inferences == 1


@pytest.mark.model
def test_random_is_repeatable_with_a_seed(model_cache) -> None:
    def maps(seed: str) -> np.ndarray:
        proc = run_cli("explain", "--method", "random", "--seed", seed, "--json", IMAGES / "cat.bmp")
        assert proc.returncode == 0, proc.stderr
        obj = json.loads(proc.stdout)
        assert obj["method"] == "random"
        return np.array(obj["cams"][0]["map"])

    a, b, c = maps("1"), maps("1"), maps("2")
    assert a.shape == (7, 7) and np.array_equal(a, b) and not np.array_equal(a, c)
