"""The model manifest, `edgecam models fetch/list`, and resolving a model by name or by path.

The shared models in ../shared/models stand in for the public URLs: as a directory
mirror (the `model_cache` fixture sets EDGECAM_MODEL_MIRROR to it) and as an HTTP
mirror served on loopback. Broken mirrors and manifests are built in tmp_path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IMAGES, MODELS, ROOT, one_error_line, run_cli

from edgecam.core import manifest as m

DEFAULT = "tf2_mobilenet_v2_1.0_224_ptq"
DEFAULT_FILE = f"{DEFAULT}.tflite"
LABELS_FILE = "imagenet_labels.txt"
CAT = IMAGES / "cat.bmp"


def readme_sha256() -> dict[str, str]:
    """The sha256 block of ../shared/models/README.md: file name (as listed) -> digest."""
    text = (MODELS / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^## sha256\s*\n+```[^\n]*\n(.*?)\n```", text, re.M | re.S)
    assert block, "README.md has no ```-fenced block under '## sha256'"
    sums = {}
    for line in block.group(1).splitlines():
        if line.strip():
            digest, name = line.split()
            assert re.fullmatch(r"[0-9a-f]{64}", digest), line
            sums[name] = digest
    return sums


README_SHA256 = readme_sha256()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_files(cache: Path) -> list[Path]:
    """Every file under the cache, temp files included."""
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # silence the per-request log on stderr
        pass


@pytest.fixture(scope="module")
def http_mirror() -> Iterator[str]:
    """../shared/models served read-only on 127.0.0.1 (an ephemeral port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(MODELS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- the manifest -------------------------------------------------------------------------------


def test_shipped_manifest_loads_with_default() -> None:
    assert m.MANIFEST == ROOT / "models" / "manifest.toml"
    manifest = m.load_manifest(m.MANIFEST)
    assert manifest.default == DEFAULT
    assert set(manifest.models) == {DEFAULT, "mobilenet_v2_1.0_224_quant", "mobilenet_v1_0.25_128_quant"}
    for name, entry in manifest.models.items():
        assert entry.name == name
        assert entry.filename == f"{name}.tflite"
        assert entry.labels_filename == LABELS_FILE
        assert entry.description


def test_manifest_sha256_matches_shared_readme() -> None:
    assert LABELS_FILE in README_SHA256 and DEFAULT_FILE in README_SHA256
    manifest = m.load_manifest(m.MANIFEST)
    for entry in manifest.models.values():
        assert entry.sha256 == README_SHA256[entry.filename], entry.name
        assert entry.labels_sha256 == README_SHA256[entry.labels_filename], entry.name


# --- fetching from a directory mirror -----------------------------------------------------------


def test_fetch_from_directory_mirror_then_already_cached(model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", MODELS)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    model = model_cache / DEFAULT / DEFAULT_FILE
    labels = model_cache / DEFAULT / LABELS_FILE
    assert proc.stdout.strip() == f"{DEFAULT}: fetched, {model}"
    assert cache_files(model_cache) == sorted([model, labels])  # no .part files left behind
    assert sha256(model) == README_SHA256[DEFAULT_FILE]
    assert sha256(labels) == README_SHA256[LABELS_FILE]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (model, labels)}

    again = run_cli("models", "fetch", "--mirror", MODELS)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"{DEFAULT}: already cached, {model}"
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (model, labels)} == before
    assert cache_files(model_cache) == sorted([model, labels])


def test_fetch_named_model_uses_env_mirror(model_cache: Path) -> None:
    # No --mirror: the fixture's EDGECAM_MODEL_MIRROR (the shared directory) is used.
    name = "mobilenet_v1_0.25_128_quant"
    proc = run_cli("models", "fetch", name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{name}: fetched, ")
    assert sha256(model_cache / name / f"{name}.tflite") == README_SHA256[f"{name}.tflite"]
    assert not (model_cache / DEFAULT).exists()


def test_models_list_shows_cached_and_not_cached(model_cache: Path) -> None:
    proc = run_cli("models", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{DEFAULT} (default): not cached;")
    assert any(line.startswith("mobilenet_v2_1.0_224_quant: not cached;") for line in lines)
    assert lines[-1] == f"cache: {model_cache}"

    assert run_cli("models", "fetch").returncode == 0
    lines = run_cli("models", "list").stdout.splitlines()
    assert lines[0].startswith(f"{DEFAULT} (default): cached;")
    assert any(line.startswith("mobilenet_v2_1.0_224_quant: not cached;") for line in lines)
    assert any(line.startswith("mobilenet_v1_0.25_128_quant: not cached;") for line in lines)


# --- fetching from an HTTP mirror ---------------------------------------------------------------


def test_fetch_from_http_mirror_option(model_cache: Path, http_mirror: str) -> None:
    proc = run_cli("models", "fetch", "--mirror", http_mirror)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{DEFAULT}: fetched, ")
    assert sha256(model_cache / DEFAULT / DEFAULT_FILE) == README_SHA256[DEFAULT_FILE]
    assert sha256(model_cache / DEFAULT / LABELS_FILE) == README_SHA256[LABELS_FILE]
    assert len(cache_files(model_cache)) == 2


def test_fetch_from_http_mirror_env(model_cache: Path, http_mirror: str) -> None:
    name = "mobilenet_v2_1.0_224_quant"
    proc = run_cli("models", "fetch", name, env={"EDGECAM_MODEL_MIRROR": http_mirror})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{name}: fetched, ")
    assert sha256(model_cache / name / f"{name}.tflite") == README_SHA256[f"{name}.tflite"]
    assert sha256(model_cache / name / LABELS_FILE) == README_SHA256[LABELS_FILE]


def test_http_404_is_one_line(model_cache: Path, http_mirror: str) -> None:
    mirror = http_mirror + "no/such/dir/"
    proc = run_cli("models", "fetch", "--mirror", mirror)
    assert proc.returncode == 2
    one_error_line(proc, "HTTP 404", mirror + DEFAULT_FILE)
    assert proc.stdout == ""
    assert cache_files(model_cache) == []


# --- broken mirrors -----------------------------------------------------------------------------


def test_sha256_mismatch_installs_nothing(model_cache: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    fake = mirror / DEFAULT_FILE
    fake.write_bytes(b"these are not the model's bytes\n" * 1000)
    proc = run_cli("models", "fetch", "--mirror", mirror)
    assert proc.returncode == 2
    line = one_error_line(proc, "sha256 mismatch", str(fake))
    assert README_SHA256[DEFAULT_FILE] in line  # what was expected
    assert proc.stdout == ""
    assert cache_files(model_cache) == []  # neither the file nor a .part temp file


def test_sha256_mismatch_of_labels_installs_no_labels(model_cache: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / DEFAULT_FILE).symlink_to(MODELS / DEFAULT_FILE)
    bad_labels = mirror / LABELS_FILE
    bad_labels.write_text("background\ncat\ndog\n", encoding="utf-8")
    proc = run_cli("models", "fetch", "--mirror", mirror)
    assert proc.returncode == 2
    one_error_line(proc, "sha256 mismatch", str(bad_labels))
    left = cache_files(model_cache)
    assert not any(p.name.endswith(".part") for p in left), left
    assert model_cache / DEFAULT / LABELS_FILE not in left


def test_file_missing_from_mirror_dir(model_cache: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "empty-mirror"
    mirror.mkdir()
    proc = run_cli("models", "fetch", "--mirror", mirror)
    assert proc.returncode == 2
    one_error_line(proc, str(mirror / DEFAULT_FILE), "cannot read", "No such file")
    assert cache_files(model_cache) == []


def test_unknown_model_name(model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "no_such_model")
    assert proc.returncode == 2
    one_error_line(proc, "unknown model 'no_such_model'", DEFAULT)
    assert cache_files(model_cache) == []


# --- resolving a model for `explain` ------------------------------------------------------------


@pytest.mark.model
def test_explain_by_name_fetches_from_mirror(model_cache: Path) -> None:
    assert cache_files(model_cache) == []
    proc = run_cli("explain", "--model", DEFAULT, CAT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{CAT}: Egyptian cat ")
    assert sha256(model_cache / DEFAULT / DEFAULT_FILE) == README_SHA256[DEFAULT_FILE]
    assert sha256(model_cache / DEFAULT / LABELS_FILE) == README_SHA256[LABELS_FILE]


@pytest.mark.model
def test_explain_by_name_from_http_mirror(model_cache: Path, http_mirror: str) -> None:
    name = "mobilenet_v1_0.25_128_quant"
    proc = run_cli("explain", "-m", name, CAT, env={"EDGECAM_MODEL_MIRROR": http_mirror})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{CAT}: Egyptian cat ")
    assert (model_cache / name / f"{name}.tflite").is_file()


@pytest.mark.model
def test_explain_by_path_finds_labels_beside_it(model_cache: Path) -> None:
    model = MODELS / "mobilenet_v2_1.0_224_quant.tflite"
    proc = run_cli("explain", "--model", model, CAT)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"{CAT}: Egyptian cat "), line
    assert "class " not in line  # real label names, not "class 286"
    assert cache_files(model_cache) == []  # a model given by path is used in place


# --- bad manifests ------------------------------------------------------------------------------

GOOD_ENTRY = f"""
[models."{DEFAULT}"]
url = "https://example.invalid/{DEFAULT_FILE}"
sha256 = "{README_SHA256[DEFAULT_FILE]}"
"""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param('default = "x"\n[models\n', "invalid TOML", id="invalid-toml"),
        pytest.param('default = "no_such_model"\n' + GOOD_ENTRY, "'no_such_model' is not listed", id="bad-default"),
        pytest.param(
            f'default = "{DEFAULT}"\n[models."{DEFAULT}"]\nurl = "https://example.invalid/{DEFAULT_FILE}"\n',
            f"models.{DEFAULT}.sha256 is missing",
            id="missing-sha256",
        ),
        pytest.param('default = "x"\nmodels = 3\n', "'models' must be a table", id="models-not-a-table"),
        pytest.param(
            f'default = "{DEFAULT}"\n[models."{DEFAULT}"]\nurl = "https://example.invalid/{DEFAULT_FILE}"\n'
            'sha256 = "00"\nlabels_url = "https://example.invalid/labels.txt"\n',
            "labels_sha256 is missing",
            id="labels-without-sha256",
        ),
    ],
)
@pytest.mark.parametrize("command", [("models", "list"), ("models", "fetch")], ids=["list", "fetch"])
def test_bad_manifest_is_one_line(
    model_cache: Path, tmp_path: Path, text: str, needle: str, command: tuple[str, ...]
) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(text, encoding="utf-8")
    proc = run_cli(*command, env={"EDGECAM_MANIFEST": str(manifest)})
    assert proc.returncode == 2
    one_error_line(proc, str(manifest), needle)
    assert proc.stdout == ""
    assert cache_files(model_cache) == []


def test_good_tmp_manifest_is_used(model_cache: Path, tmp_path: Path) -> None:
    """EDGECAM_MANIFEST really replaces the shipped manifest (so the bad-manifest tests mean something)."""
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(f'default = "{DEFAULT}"\n' + GOOD_ENTRY, encoding="utf-8")
    proc = run_cli("models", "list", env={"EDGECAM_MANIFEST": str(manifest)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"{DEFAULT} (default): not cached;")
    assert "mobilenet_v2_1.0_224_quant" not in proc.stdout


def test_unreadable_manifest_and_cache_are_one_line(model_cache: Path, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"\xff\xfe")
    proc = run_cli("models", "list", env={"EDGECAM_MANIFEST": str(bad)})
    assert proc.returncode == 2
    one_error_line(proc, str(bad), "not UTF-8")
    proc = run_cli("models", "list", env={"EDGECAM_MANIFEST": str(tmp_path)})
    assert proc.returncode == 2
    one_error_line(proc, str(tmp_path), "cannot read model manifest")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    proc = run_cli("models", "fetch", env={"EDGECAM_MODEL_DIR": str(a_file)})
    assert proc.returncode == 2
    one_error_line(proc, str(a_file), "cannot write to the model cache")
