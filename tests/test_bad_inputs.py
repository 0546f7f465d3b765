"""Every bad input gets one clear line naming the file and what is wrong, a non-zero exit, no traceback.

Exit 2: the model, labels or command line is wrong and nothing ran. Exit 1: some images
failed but the others were explained. Broken files are made in tmp_path; the shared
models and images are used in place.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, IMAGES, LABELS, MODELS, one_error_line, run_cli

pytestmark = pytest.mark.model

CAT = IMAGES / "cat.bmp"
BAD = MODELS / "bad"


def explain_fails(*args: str | Path) -> subprocess.CompletedProcess:
    """`edgecam explain ARGS`, expected to refuse with exit 2 before printing any result."""
    proc = run_cli("explain", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    return proc


def with_opcode_replaced(data: bytes, old: int, new: int) -> bytes:
    """The model with every operator code `old` (a BuiltinOperator) changed to `new`, in place.

    Reads Model.operator_codes (field 1); OperatorCode has deprecated_builtin_code (field 0,
    int8) and builtin_code (field 3, int32), and the runtime uses the larger of the two.
    """
    out = bytearray(data)

    def u32(pos: int) -> int:
        return struct.unpack_from("<I", out, pos)[0]

    def field(table: int, index: int) -> int | None:
        vtable = table - struct.unpack_from("<i", out, table)[0]
        entry = 4 + 2 * index
        if entry >= struct.unpack_from("<H", out, vtable)[0]:
            return None
        offset = struct.unpack_from("<H", out, vtable + entry)[0]
        return table + offset if offset else None

    model = u32(0)
    codes_field = field(model, 1)
    assert codes_field is not None
    codes = codes_field + u32(codes_field)
    replaced = 0
    for i in range(u32(codes)):
        element = codes + 4 + 4 * i
        code = element + u32(element)
        dep, bi = field(code, 0), field(code, 3)
        value = max(
            struct.unpack_from("<b", out, dep)[0] if dep else 0, struct.unpack_from("<i", out, bi)[0] if bi else 0
        )
        if value == old:
            if dep:
                struct.pack_into("<b", out, dep, new)
            if bi:
                struct.pack_into("<i", out, bi, new)
            replaced += 1
    assert replaced, f"no operator code {old} in the model"
    return bytes(out)


# --- the model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "jpeg"])
def test_model_that_is_not_tflite(model_cache: Path, tmp_path: Path, kind: str) -> None:
    if kind == "text":
        model = tmp_path / "notes.tflite"
        model.write_text("this is a text file, not a model\n", encoding="utf-8")
    else:
        model = IMAGES / "cat_720p.jpg"
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "not a TFLite model")


def test_truncated_model(model_cache: Path, tmp_path: Path) -> None:
    model = tmp_path / "truncated.tflite"
    model.write_bytes(DEFAULT_MODEL.read_bytes()[:100_000])
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "truncated")


def test_model_without_classifier_head(model_cache: Path) -> None:
    model = BAD / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "no classifier head found")


def test_model_invoking_error(model_cache: Path) -> None:
    # Its only tensors are a [1, 3] input and a scalar output around an unresolved custom op:
    # edgecam rejects it from the graph, before the interpreter is asked to load it.
    model = BAD / "model_invoking_error.tflite"
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "input shape [1, 3] is not an image")


def test_model_the_interpreter_cannot_load(model_cache: Path, tmp_path: Path) -> None:
    # The default model with its DEPTHWISE_CONV_2D (4) ops turned into CUSTOM (32) ops with no
    # custom_code: the graph still has a CAM head, but the interpreter refuses to build it.
    model = tmp_path / "unresolved_op.tflite"
    model.write_bytes(with_opcode_replaced(DEFAULT_MODEL.read_bytes(), 4, 32))
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "the interpreter cannot load this model")


def test_missing_model_path(model_cache: Path, tmp_path: Path) -> None:
    model = tmp_path / "nowhere" / "model.tflite"
    proc = explain_fails("--model", model, CAT)
    one_error_line(proc, str(model), "model file not found")


def test_directory_as_model(model_cache: Path, tmp_path: Path) -> None:
    proc = explain_fails("--model", tmp_path, CAT)
    one_error_line(proc, str(tmp_path), "is a directory, not a model file")


def test_unknown_model_name(model_cache: Path) -> None:
    proc = explain_fails("--model", "no_such_model", CAT)
    one_error_line(proc, "unknown model 'no_such_model'")


# --- labels -------------------------------------------------------------------------------------


def test_labels_with_wrong_count(model_cache: Path, tmp_path: Path) -> None:
    labels = tmp_path / "ten.txt"
    labels.write_text("\n".join(LABELS.read_text(encoding="utf-8").splitlines()[:10]) + "\n", encoding="utf-8")
    proc = explain_fails("--labels", labels, CAT)
    one_error_line(proc, str(labels), "has 10 labels, the model has 1001 classes")


def test_missing_labels_file(model_cache: Path, tmp_path: Path) -> None:
    labels = tmp_path / "none.txt"
    proc = explain_fails("--labels", labels, CAT)
    one_error_line(proc, str(labels), "labels file not found")


def test_labels_without_background_line(model_cache: Path, tmp_path: Path) -> None:
    lines = LABELS.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1001 and lines[0] == "background"
    labels = tmp_path / "thousand.txt"
    labels.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")

    with_background = run_cli("explain", "--json", "--labels", LABELS, CAT)
    without = run_cli("explain", "--json", "--labels", labels, CAT)
    assert with_background.returncode == 0, with_background.stderr
    assert without.returncode == 0, without.stderr
    top_a = json.loads(with_background.stdout)["top"][0]
    top_b = json.loads(without.stdout)["top"][0]
    assert top_a["label"] == "Egyptian cat"
    assert (top_b["id"], top_b["label"]) == (top_a["id"], top_a["label"])


# --- --class ------------------------------------------------------------------------------------


def test_class_not_a_label(model_cache: Path) -> None:
    proc = explain_fails("--class", "nosuchclass", CAT)
    one_error_line(proc, "'nosuchclass'", "not a label")


def test_class_id_out_of_range(model_cache: Path) -> None:
    proc = explain_fails("--class", "5000", CAT)
    one_error_line(proc, "5000", "out of range", "0..1000")


def test_class_by_name_adds_a_cam(model_cache: Path) -> None:
    proc = run_cli("explain", "--json", "--class", "tabby", CAT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert result["top"][0]["label"] == "Egyptian cat"
    cams = result["cams"]
    assert [c["label"] for c in cams] == ["Egyptian cat", "tabby, tabby cat"]
    assert [c["id"] for c in cams] == [result["top"][0]["id"], 282]
    for c in cams:
        assert len(c["map"]) == 7 and all(len(row) == 7 for row in c["map"])


# --- images -------------------------------------------------------------------------------------


def test_some_images_bad_others_still_explained(model_cache: Path, tmp_path: Path) -> None:
    text_as_jpg = tmp_path / "x.jpg"
    shutil.copyfile(IMAGES / "README.md", text_as_jpg)
    noise_as_png = tmp_path / "bad.png"
    noise_as_png.write_bytes(random.Random(0).randbytes(4096))
    missing = tmp_path / "missing.jpg"

    proc = run_cli("explain", text_as_jpg, CAT, noise_as_png, missing)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{CAT}: Egyptian cat "), proc.stdout

    err = proc.stderr.strip().splitlines()
    assert len(err) == 4, proc.stderr  # one line per bad input, then the count
    assert err[0] == f"edgecam: {text_as_jpg}: cannot read as an image (unsupported or corrupt file)"
    assert err[1] == f"edgecam: {noise_as_png}: cannot read as an image (unsupported or corrupt file)"
    assert err[2] == f"edgecam: {missing}: no such file or directory"
    assert err[3] == "edgecam: 3 of 4 inputs failed"


# --- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--top", "0"), "--top 0"),
        (("--threads", "0"), "--threads 0"),
        (("--threads", "65"), "--threads 65"),
    ],
    ids=["top-0", "threads-0", "threads-65"],
)
def test_bad_option_values(model_cache: Path, args: tuple[str, str], needle: str) -> None:
    proc = explain_fails(*args, CAT)
    one_error_line(proc, needle)


@pytest.mark.parametrize("command", ["explain --method random", "explain --method rise --samples 10",
                                     "evaluate --method cam"])
def test_negative_seed_is_one_line(model_cache: Path, command: str) -> None:
    # numpy's generator raised ValueError from deep inside the method: a traceback.
    proc = run_cli(*command.split(), "--seed", "-1", CAT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_error_line(proc, "--seed -1")


def test_threads_from_the_environment_must_be_a_number(model_cache: Path) -> None:
    proc = run_cli("explain", IMAGES / "cat.bmp", env={"EDGECAM_THREADS": "abc"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["edgecam: error: EDGECAM_THREADS='abc' is not a whole number"]


@pytest.mark.parametrize("argv", [(), ("models",)], ids=["no-command", "models-no-action"])
def test_missing_command_shows_usage_and_fails(argv: tuple[str, ...]) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: edgecam") and proc.stdout == ""
