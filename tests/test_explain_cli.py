"""`edgecam explain`, `inspect` and `--version` as a user runs them, on the real models and images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ALL_MODELS, EXPECTED, IMAGES, MODELS, SCORE_TOLERANCE, run_cli

pytestmark = pytest.mark.model


def _explain_all(*args: str) -> dict[str, dict]:
    res = run_cli("explain", "--json", *args, IMAGES)
    assert res.returncode == 0, res.stderr
    rows = {Path(r["image"]).name: r for r in map(json.loads, res.stdout.splitlines())}
    assert set(rows) == {p.name for p in IMAGES.iterdir() if p.suffix in (".bmp", ".jpg")}
    return rows


@pytest.mark.parametrize("name", ALL_MODELS)
def test_explain_prints_the_labels_the_models_readme_lists(model_cache: Path, name: str) -> None:
    """With the README's own preprocessing (INTER_AREA over the whole frame), labels and scores match it."""
    rows = _explain_all("--model", name, "--exact-resize")
    for image, (label, score) in EXPECTED[name].items():
        top = rows[image]["top"][0]
        assert top["label"].split(",")[0] == label, (image, top)
        assert abs(top["score"] - score) <= SCORE_TOLERANCE, (image, top["score"], score)


@pytest.mark.parametrize("name", ["tf2_mobilenet_v2_1.0_224_ptq", "mobilenet_v2_1.0_224_quant"])
def test_fast_resize_keeps_the_labels(model_cache: Path, name: str) -> None:
    """The default (fast) downscaling keeps every top-1 label of the MobileNetV2 models, with scores
    close to the exact path's (measured: within 0.01 on ai-edge-litert + OpenCV 5, within 0.06 on
    tflite-runtime + OpenCV 4.11)."""
    fast, exact = _explain_all("--model", name), _explain_all("--model", name, "--exact-resize")
    for image, (label, _) in EXPECTED[name].items():
        assert fast[image]["top"][0]["label"].split(",")[0] == label, (image, fast[image]["top"][0])
        assert abs(fast[image]["top"][0]["score"] - exact[image]["top"][0]["score"]) <= 0.07, image


def test_readable_lines_and_default_model(model_cache: Path) -> None:
    res = run_cli("explain", IMAGES / "cat.bmp", IMAGES / "dragonfly.bmp")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"{IMAGES / 'cat.bmp'}: Egyptian cat 0.")
    assert lines[1].startswith(f"{IMAGES / 'dragonfly.bmp'}: dragonfly 0.")
    assert lines[0].count("|") == 2  # top-3
    assert "INFO:" not in res.stderr  # the runtime's delegate chatter is not for field logs


def test_json_schema_and_raw_maps(model_cache: Path) -> None:
    res = run_cli("explain", "--json", "--top", "5", "--class", "tabby", "--class", "281", IMAGES / "cat.bmp")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert set(obj) == {"image", "model", "top", "cams", "input"}
    assert obj["model"] == "tf2_mobilenet_v2_1.0_224_ptq"
    # How the frame became the input: a uint8 model takes raw RGB pixels; 512x341 is under 3x of 224.
    inp = obj["input"]
    assert (inp["layout"], inp["channels"], inp["resize"]) == ("NHWC", 3, "exact (auto)")
    assert inp["normalization"]["source"] == "quantization"
    assert len(obj["top"]) == 5 and all(set(t) == {"id", "label", "score"} for t in obj["top"])
    assert [c["id"] for c in obj["cams"]] == [obj["top"][0]["id"], 282, 281]
    for c in obj["cams"]:
        m = np.array(c["map"])
        assert m.shape == (7, 7) and np.isfinite(m).all() and np.ptp(m) > 0
    # Raw maps, not normalised: their values are the class evidence in logit units.
    assert np.array(obj["cams"][0]["map"]).max() > 1.0


def test_out_writes_overlays(model_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_cli("explain", "--out", out, "--class", "tabby", IMAGES / "cat.bmp", IMAGES / "grace_hopper.bmp")
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{stem}.cam{c}.{style}.jpg"
        for stem, cid in (("cat", 286), ("grace_hopper", 653))
        for c in (cid, 282)
        for style in ("blend", "dim")
    )
    img = cv2.imread(str(out / "grace_hopper.cam653.blend.jpg"))
    assert img.shape == cv2.imread(str(IMAGES / "grace_hopper.bmp")).shape
    res = run_cli("explain", "--out", out, "--style", "dim", "--format", "png", IMAGES / "bird.bmp")
    assert res.returncode == 0 and (out / "bird.cam20.dim.png").exists(), (res.stderr, sorted(out.iterdir()))


def test_crop_option_runs(model_cache: Path) -> None:
    res = run_cli("explain", "--crop", IMAGES / "cat_720p.jpg")
    assert res.returncode == 0 and "Egyptian cat" in res.stdout, res.stderr


def test_inspect_and_version(model_cache: Path) -> None:
    res = run_cli("inspect", MODELS / "mobilenet_v2_1.0_224_quant.tflite")
    assert res.returncode == 0, res.stderr
    assert "AVERAGE_POOL_2D" in res.stdout and "[1, 7, 7, 1280]" in res.stdout and "runtime:" in res.stdout
    info = json.loads(run_cli("inspect", "--json").stdout)
    assert info["head"]["pool"] == "MEAN"
    assert info["head"]["feature_map"]["shape"] == [1, 7, 7, 1280]
    assert info["head"]["classifier_weights"]["quantization"].startswith("per-channel")
    assert info["classes"] == 1001
    ver = run_cli("--version")
    assert ver.returncode == 0 and "edgecam" in ver.stdout
    assert "ai-edge-litert" in ver.stdout or "tflite-runtime" in ver.stdout


def test_models_prepare_never_writes_over_its_input(tmp_path: Path) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes((MODELS / "mobilenet_v1_0.25_128_quant.tflite").read_bytes())
    before = model.read_bytes()
    link = tmp_path / "same.tflite"
    link.symlink_to(model)
    for out in (model, link):
        res = run_cli("models", "prepare", model, out)
        assert res.returncode == 2 and "is the input model itself" in res.stderr and "Traceback" not in res.stderr
    assert model.read_bytes() == before


def test_models_prepare_writes_a_model_with_the_feature_output(tmp_path: Path) -> None:
    out = tmp_path / "prepared.tflite"
    res = run_cli("models", "prepare", MODELS / "tf2_mobilenet_v2_1.0_224_ptq.tflite", out)
    assert res.returncode == 0, res.stderr
    from edgecam.core.tflite_graph import parse

    graph = parse(out.read_bytes())
    assert graph.outputs == (176, 171, 173)
    # A prepared model loads as a model in its own right and explains the same.
    res = run_cli("explain", "--model", out, "--labels", MODELS / "imagenet_labels.txt", IMAGES / "cat.bmp")
    assert res.returncode == 0 and "Egyptian cat" in res.stdout, res.stderr
