"""The explanation methods as one family: the registry, the shared pipeline, and what each method owes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ALL_MODELS, DEFAULT_MODEL, IMAGES, LABELS, MODELS, one_error_line, run_cli

from edgecam.core.errors import EdgecamError
from edgecam.core.explain import explain_frame
from edgecam.core.layers import stages
from edgecam.core.methods import COSTS, REGISTRY, Method, Scorer, check_options, make, names, options_of
from edgecam.core.methods.base import fine_grid
from edgecam.core.methods.lime import kernel, weighted_ridge
from edgecam.core.methods.rise import rise_masks
from edgecam.core.methods.superpixels import slic, to_lab
from edgecam.core.model import Classifier
from edgecam.core.preprocess import to_input
from edgecam.device.daemon import DAEMON_METHOD
from edgecam.device.workers import scorer_for


def test_registry_names_costs_and_options() -> None:
    assert {"cam", "occlusion", "wide", "random"} <= set(REGISTRY)
    for name, info in REGISTRY.items():
        cls = info.load()
        assert issubclass(cls, Method)
        # What the registry declares is what the class says.
        assert (cls.name, cls.cost, cls.summary, cls.square_input) == (name, info.cost, info.summary,
                                                                         info.square_input)
        assert info.cost in COSTS and info.summary
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


# -- the sampling methods: LIME, RISE, Score-CAM ---------------------------------------------------------

# Few samples: these tests check the machinery and the seeds; the docs' table uses the defaults.
FEW = {"lime": {"samples": 40, "segments": 12}, "rise": {"samples": 40}, "scorecam": {"channels": 12}}


def _loadable() -> list[Path]:
    """Every model in ../shared/models, and those in more/ that load today (the rest are refused with
    one line: another input layout or no classifier head)."""
    found = [MODELS / f"{m}.tflite" for m in ALL_MODELS]
    for path in sorted((MODELS / "more").glob("*.tflite")):
        try:
            Classifier(path)
        except EdgecamError:
            continue
        found.append(path)
    return found


def test_slic_keeps_to_colour_edges() -> None:
    # Four flat quadrants in four colours: no superpixel may straddle a quadrant's edge.
    img = np.zeros((64, 64, 3), np.float32)
    img[:32, 32:] = (1, 0, 0)
    img[32:, :32] = (0, 1, 0)
    img[32:, 32:] = (0, 0, 1)
    labels = slic(to_lab(img), 16)
    assert labels.shape == (64, 64) and labels.min() == 0
    assert 8 <= labels.max() + 1 <= 24
    quadrant = (np.arange(64)[:, None] >= 32) * 2 + (np.arange(64)[None, :] >= 32)
    for seg in range(labels.max() + 1):
        assert len(np.unique(quadrant[labels == seg])) == 1, f"segment {seg} crosses a colour edge"


def test_weighted_ridge_and_kernel() -> None:
    rng = np.random.default_rng(0)
    z = (rng.random((400, 6)) < 0.5).astype(np.float64)
    true = np.array([0.5, -0.2, 0.0, 0.3, 0.1, -0.4])
    y = (z @ true + 0.7)[:, None]
    w = rng.random(400) + 0.1
    assert np.allclose(weighted_ridge(z, y, w, alpha=1e-9)[:, 0], true, atol=1e-6)
    # The kernel: the full picture weighs most, less and less as segments go.
    k = kernel(np.array([10.0, 7.0, 3.0, 0.0]), 10)
    assert k[0] == pytest.approx(1.0) and np.all(np.diff(k) < 0)


def test_rise_masks_are_seeded_soft_and_half_kept() -> None:
    a = rise_masks(np.random.default_rng(5), 200, 7, 224, 224)
    b = rise_masks(np.random.default_rng(5), 200, 7, 224, 224)
    assert a.shape == (200, 224, 224) and a.dtype == np.float32 and np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0 and 0.4 < a.mean() < 0.6
    assert len(np.unique(a[0])) > 2  # bilinear edges, not a hard grid


@pytest.mark.model
@pytest.mark.parametrize("path", _loadable(), ids=lambda p: p.stem)
def test_each_method_on_each_model_is_repeatable(path: Path) -> None:
    clf = Classifier(path)
    frame = cv2.imread(str(IMAGES / "cat.bmp"))
    x, _ = to_input(frame, clf.input)
    inf = clf.infer(x)
    top = int(np.argmax(inf.scores))
    classes = [top, (top + 1) % clf.num_classes]
    fine = fine_grid(clf.input)
    with scorer_for(clf, 2) as two:
        for name, opts in FEW.items():
            one = make(name, seed=1, **opts).maps(clf, x, inf, classes)
            again = make(name, seed=1, **opts).maps(clf, x, inf, classes, two)  # 2 workers: the same maps
            grid = clf.feature_shape[1:3] if name == "scorecam" else fine
            assert one.maps.shape == (2, *grid), name
            assert np.all(np.isfinite(one.maps)) and np.ptp(one.maps[0]) > 0, name
            assert np.allclose(one.maps, again.maps, atol=1e-5), f"{name}: workers changed the map"
            if name != "scorecam":  # Score-CAM draws nothing at random
                other = make(name, seed=2, **opts).maps(clf, x, inf, classes)
                assert not np.allclose(one.maps, other.maps), f"{name}: the seed changes nothing"
            runs = {"lime": 1 + 40, "rise": 1 + 40}.get(name)
            assert runs is None or one.inferences == runs


@pytest.mark.model
def test_thread_scorer_gives_the_serial_scores() -> None:
    clf = Classifier(DEFAULT_MODEL, LABELS)
    x, _ = to_input(cv2.imread(str(IMAGES / "parrot.jpg")), clf.input)
    batch = np.repeat(x, 7, axis=0)
    batch[1::2, :100] = 128
    serial = Scorer(clf)(batch)
    with scorer_for(clf, 3) as three:
        assert three.how() == "one invoke() each on 3 interpreters"
        assert np.allclose(three(batch), serial, atol=1e-6)
    assert not np.allclose(serial[0], serial[1])  # the batch's rows really differ


@pytest.mark.model
@pytest.mark.parametrize("model", ALL_MODELS)
def test_explain_each_sampling_method_from_the_command_line(model_cache: Path, model: str, tmp_path: Path) -> None:
    for name, opts in FEW.items():
        flags = [f"--{k}={v}" for k, v in opts.items()] + (["--seed", "3"] if "seed" in options_of(name) else [])
        proc = run_cli("explain", "--model", model, "--method", name, *flags, "--json",
                       "--out", tmp_path, "--style", "blend", IMAGES / "parrot.jpg")
        assert proc.returncode == 0, proc.stderr
        obj = json.loads(proc.stdout)
        assert obj["method"] == name
        assert np.array(obj["cams"][0]["map"]).ndim == 2
        line = proc.stderr.strip()
        assert line.startswith(f"edgecam: parrot.jpg: {name}: ") and " inferences (one invoke() each" in line
        assert (tmp_path / f"parrot.cam{obj['top'][0]['id']}.blend.jpg").exists()


@pytest.mark.model
def test_sampling_methods_beat_random_on_the_shared_images(model_cache: Path) -> None:
    proc = run_cli("evaluate", "--json", "--steps", "8", "--method", "lime", "--method", "rise",
                   "--method", "scorecam", "--method", "random", "--samples", "100", "--segments", "30",
                   "--channels", "32", IMAGES, timeout=900)
    assert proc.returncode == 0, proc.stderr
    mean = json.loads(proc.stdout)["mean"]
    for name in ("lime", "rise", "scorecam"):
        assert mean[name]["deletion"] < mean["random"]["deletion"], (name, mean)
        assert mean[name]["insertion"] > mean["random"]["insertion"], (name, mean)
        assert mean[name]["ms"] > mean["random"]["ms"]


@pytest.mark.model
@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["explain", "--method", "lime", "--samples", "0"], ["--samples 0", "from 10"]),
        (["explain", "--method", "lime", "--segments", "1"], ["--segments 1"]),
        (["explain", "--method", "rise", "--cells", "1"], ["--cells 1"]),
        (["explain", "--method", "scorecam", "--channels", "0"], ["--channels 0"]),
        (["explain", "--method", "scorecam", "--stage", "99"], ["--stage 99", "stages 1 to 5"]),
        (["explain", "--method", "scorecam", "--stage", "no/such/tensor"], ["--stage", "no such stage"]),
        (["explain", "--method", "rise", "--workers", "0"], ["--workers 0"]),
        (["evaluate", "--method", "rise", "--samples", "5"], ["--samples 5"]),
        (["layers", "--class", "no such class"], ["no such class"]),
        (["layers", "--class", "tabby", "--channels", "0"], ["--channels 0"]),
    ],
)
def test_method_option_errors_are_one_line(model_cache: Path, args: list[str], needles: list[str]) -> None:
    proc = run_cli(*args, IMAGES / "cat.bmp")
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc, *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # Before: taken and silently ignored; the map was the plain CAM.
        (["explain", "--method", "cam", "--samples", "100"], ["--samples applies to --method lime, rise; not to cam"]),
        (["explain", "--segments", "20"], ["--segments applies to --method lime; not to cam"]),
        (["explain", "--method", "lime", "--stage", "2"], ["--stage applies to --method scorecam; not to lime"]),
        (["explain", "--method", "rise", "--channels", "8"], ["--channels applies to --method scorecam"]),
        (["explain", "--method", "occlusion", "--cells", "4"], ["--cells applies to --method rise"]),
        (["explain", "--method", "scorecam", "--seed", "3"], ["--seed applies to --method lime, rise, random"]),
        (["explain", "--wide", "--patch", "30"], ["--patch applies to --method occlusion; not to wide"]),
        (["explain", "--method", "lime", "--stride", "14"], ["--stride applies to --method occlusion"]),
        (["explain", "--method", "random", "--workers", "2"], ["--workers applies to", "occlusion, lime, scorecam, "
                                                                "rise; not to random"]),
        (["evaluate", "--method", "cam", "--samples", "100"], ["--samples applies to --method lime, rise; not to cam"]),
        # evaluate's default methods (cam, occlusion, random) take no --segments.
        (["evaluate", "--segments", "20"], ["--segments applies to --method lime; not to cam, occlusion, random"]),
    ],
)
def test_an_option_of_another_method_is_refused(args: list[str], needles: list[str]) -> None:
    proc = run_cli(*args, IMAGES / "cat.bmp")
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc, *needles)


def test_which_method_takes_which_option_comes_from_the_methods() -> None:
    from edgecam.cli import build_parser

    # Every method option of the command line is some method's field, so none is refused by all.
    for command in ("explain", "evaluate"):
        args = build_parser([command]).parse_args([command, "x.jpg"])
        for option in args.method_options:
            assert any(option in options_of(n) for n in REGISTRY), (command, option)
            assert getattr(args, option) is None  # not given: a default would look given
    assert options_of("lime") == {"samples", "segments", "seed"}
    assert options_of("cam") == frozenset()
    check_options(["lime", "rise"], {"samples": 10, "cells": 4, "segments": 12, "stage": None})
    with pytest.raises(EdgecamError, match=r"^--cells applies to --method rise; not to lime$"):
        check_options(["lime"], {"samples": 10, "cells": 4})


@pytest.mark.model
def test_evaluate_takes_a_seed_for_any_method(model_cache: Path) -> None:
    # evaluate breaks the curves' ties with --seed, whatever the methods: never refused there.
    proc = run_cli("evaluate", "--method", "cam", "--seed", "5", "--steps", "2", "--json", IMAGES / "cat.bmp")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"][0]["method"] == "cam"


@pytest.mark.model
def test_scorecam_at_every_stage_by_number_and_by_name() -> None:
    clf = Classifier(DEFAULT_MODEL, LABELS)
    x, _ = to_input(cv2.imread(str(IMAGES / "cat.bmp")), clf.input)
    inf = clf.infer(x)
    found = stages(clf)
    by_number = make("scorecam", stage="2", channels=6).maps(clf, x, inf, [286])
    assert by_number.maps.shape == (1, *found[1].shape[1:3])
    assert by_number.inferences == 1 + 1 + 6 + 1  # prediction, the stage's, grey, 6 channels
    by_name = make("scorecam", stage=found[1].name, channels=6).maps(clf, x, inf, [286])
    assert np.array_equal(by_number.maps, by_name.maps)
    assert by_number.maps.min() >= 0.0  # a ReLU'd sum


@pytest.mark.model
def test_layers_class_draws_a_class_map_beside_each_stage(model_cache: Path, tmp_path: Path) -> None:
    proc = run_cli("layers", "--class", "Egyptian cat", "--channels", "8", "--json", "--out", tmp_path,
                   IMAGES / "cat.bmp")
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["class"] == {"id": 286, "label": "Egyptian cat"}
    for stage in obj["stages"]:
        m = np.array(stage["class_map"])
        assert m.shape == tuple(stage["shape"][1:3]) and m.min() >= 0.0
    assert proc.stderr.count("edgecam: scorecam: stage ") == len(obj["stages"])
    picture = cv2.imread(obj["picture"])
    # Two columns (activation | class map), a row for the input and one per stage.
    assert picture.shape[1] == 2 * 320
    assert picture.shape[0] == (len(obj["stages"]) + 1) * (round(320 * 341 / 512) + 0)


@pytest.mark.model
def test_stages_skip_padded_copies() -> None:
    # The PyTorch-converted MobileNetV2 pads before each stride-2 convolution (226x226x3, 114x114x96, ...):
    # those copies are not stages, so it gets the same five sizes as the Keras MobileNetV2.
    clf = Classifier(MODELS / "more" / "pytorch_mobilenet_v2_quantized_1x3x224x224.tflite")
    assert [s.shape[1] for s in stages(clf)] == [112, 56, 28, 14, 7]
    assert [s.shape[1] for s in stages(Classifier(DEFAULT_MODEL))] == [112, 56, 28, 14, 7]


@pytest.mark.model
def test_the_command_line_explains_with_each_model_in_more(model_cache: Path) -> None:
    # Every method runs on every model in-process above; here each loadable model of more/ once from
    # the command line, the methods taken in turn, so the flags and the model's own input reach them.
    more = [p for p in _loadable() if p.parent.name == "more"]
    for k, path in enumerate(more):
        name = list(FEW)[k % len(FEW)]
        flags = [f"--{key}={value}" for key, value in FEW[name].items()]
        proc = run_cli("explain", "--model", path, "--method", name, *flags, "--json", IMAGES / "bird.bmp")
        assert proc.returncode == 0, (path.name, proc.stderr)
        obj = json.loads(proc.stdout)
        assert obj["method"] == name and np.all(np.isfinite(np.array(obj["cams"][0]["map"]))), path.name
