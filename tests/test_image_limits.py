"""Images whose header claims a huge size are refused before decoding, by a pixel limit, everywhere
an image file is read: explain, evaluate, layers and the daemon's folder source."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DEFAULT_MODEL, IMAGES, ROOT, one_error_line, run_cli

from edgecam.core.images import DEFAULT_MAX_PIXELS, ImageRefused, image_size, read_image

# Peak memory of `edgecam explain` on a normal photograph is about 90 MB here; decoding the
# 20000x20000 file as BGR takes 1.2 GB more (2.4 GB measured without the limit).
BOUNDED_MB = 400


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid greyscale PNG of width x height black pixels: a few hundred kB on disk."""
    comp = zlib.compressobj(9)
    block = b"\0" * ((width + 1) * 500)  # 500 rows, each a filter byte and the pixels
    parts = [comp.compress(block) for _ in range(height // 500)]
    parts += [comp.compress(b"\0" * ((width + 1) * (height % 500))), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts))
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = huge_png(tmp_path_factory.mktemp("huge") / "huge.png")
    assert path.stat().st_size < 1_500_000
    # A real image, not just a header: OpenCV decodes it (at an eighth of the size, to stay small).
    small = cv2.imread(str(path), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    assert small is not None and small.shape == (2500, 2500)
    return path


# The peak is read inside the command's own process (VmHWM belongs to the exec'd image; a child's
# ru_maxrss would count the test process's memory from before the exec).
_MEASURED = """
import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_KB " + line.split()[1] + "\\n")
atexit.register(peak)
from edgecam.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_measured(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """`edgecam ARGS`: exit code, stdout, stderr and the process's peak resident memory in MB."""
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    lines = proc.stderr.splitlines()
    peak = [int(line.split()[1]) for line in lines if line.startswith("PEAK_KB ")]
    assert len(peak) == 1, proc.stderr
    err = "".join(line + "\n" for line in lines if not line.startswith("PEAK_KB "))
    return proc.returncode, proc.stdout, err, peak[0] / 1024


def test_explain_refuses_a_huge_image_with_bounded_memory(huge: Path) -> None:
    rc, out, err, peak = run_measured("explain", "--model", DEFAULT_MODEL, huge, IMAGES / "cat.bmp")
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0] == (f"edgecam: {huge}: 20000x20000 is 400.0 megapixels, over the limit of 25 (not decoded; "
                        "raise the pixel limit to accept it)")
    assert lines[1] == "edgecam: 1 of 2 inputs failed"
    assert out.startswith(f"{IMAGES / 'cat.bmp'}: Egyptian cat")  # the next image is still explained
    assert peak < BOUNDED_MB, f"peak {peak:.0f} MB"


def test_the_limit_is_a_flag(huge: Path) -> None:
    rc, _, err, _ = run_measured("explain", "--model", DEFAULT_MODEL, "--max-pixels", "100000", IMAGES / "cat.bmp")
    assert rc == 1 and "512x341 is 0.2 megapixels, over the limit of 0.1" in err
    proc = run_cli("explain", "--model", DEFAULT_MODEL, "--max-pixels", "0", IMAGES / "cat.bmp")
    assert proc.returncode == 2 and "--max-pixels" in proc.stderr and "Traceback" not in proc.stderr


def test_layers_and_evaluate_refuse_it(huge: Path, tmp_path: Path) -> None:
    rc, _, err, peak = run_measured("layers", "--model", DEFAULT_MODEL, huge, "--out", tmp_path)
    assert rc == 2 and peak < BOUNDED_MB
    assert err.strip() == f"edgecam: error: {huge}: 20000x20000 is 400.0 megapixels, over the limit of 25 " \
                          "(not decoded; raise the pixel limit to accept it)"
    rc, _, err, peak = run_measured("evaluate", "--model", DEFAULT_MODEL, "--method", "cam", "--steps", "2", huge)
    assert rc == 1 and peak < BOUNDED_MB
    assert "20000x20000" in err and "Traceback" not in err


def test_folder_source_skips_it_with_one_line(huge: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a_huge.png").write_bytes(huge.read_bytes())
    (folder / "cat.bmp").write_bytes((IMAGES / "cat.bmp").read_bytes())
    env = {"EDGECAM_SPOOL_DIR": str(tmp_path / "state")}
    rc, out, err, peak = run_measured("run", "--model", DEFAULT_MODEL, "--source", folder, "--once", "--no-mqtt",
                                      env=env)
    assert rc == 0, err
    assert [json.loads(line)["top"][0]["label"] for line in out.splitlines()] == ["Egyptian cat"]
    said = [line for line in err.splitlines() if "a_huge.png" in line]
    assert len(said) == 1 and "over the limit of 25" in said[0] and "skipped" in said[0]
    assert peak < BOUNDED_MB, f"peak {peak:.0f} MB"
    # The limit is a setting: lowered below the cat, nothing is left to decode.
    rc, out, err, _ = run_measured("run", "--model", DEFAULT_MODEL, "--source", folder, "--once", "--no-mqtt",
                                   env={**env, "EDGECAM_SOURCE_MAX_PIXELS": "1000"})
    assert rc == 1 and out == "" and "no image could be decoded" in err


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tiff", ".ppm", ".pgm"])
def test_sizes_read_from_headers_match_the_decoder(tmp_path: Path, suffix: str) -> None:
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    path = tmp_path / f"x{suffix}"
    assert cv2.imwrite(str(path), image[:, :, 0] if suffix == ".pgm" else image)
    assert read_image(path).shape[:2] == (37, 53)
    with pytest.raises(ImageRefused, match=r"53x37 is 0\.0 megapixels, over the limit"):
        read_image(path, 53 * 37 - 1)


def test_jpeg_size_after_app_segments_and_progressive(tmp_path: Path) -> None:
    image = np.zeros((300, 401, 3), np.uint8)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = data.tobytes()
    # An APP1 segment (where EXIF and its thumbnail live) holding a fake SOF marker: skipped whole.
    fake_sof = b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(fake_sof) + 100) + fake_sof + b"\0" * 100
    assert image_size(data[:2] + app1 + data[2:]) == (401, 300)


def test_lying_headers_are_refused_before_decoding(tmp_path: Path) -> None:
    bmp = tmp_path / "liar.bmp"
    bmp.write_bytes(b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, 100_000, -100_000) + b"\0" * 64)
    with pytest.raises(ImageRefused, match=r"100000x100000 is 10000\.0 megapixels"):
        read_image(bmp)
    unknown = tmp_path / "x.jpg"
    unknown.write_bytes(b"GIF89a" + b"\0" * 32)
    with pytest.raises(ImageRefused, match="cannot read as an image"):
        read_image(unknown)
    assert DEFAULT_MAX_PIXELS == 25_000_000


def test_header_limit_check_is_one_line_for_explain(tmp_path: Path) -> None:
    bmp = tmp_path / "liar.bmp"
    bmp.write_bytes(b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, 30000, 30000) + b"\0" * 64)
    proc = run_cli("layers", "--model", DEFAULT_MODEL, bmp, "--out", tmp_path)
    assert proc.returncode == 2
    one_error_line(proc, "30000x30000 is 900.0 megapixels")


def test_jpeg_with_a_large_icc_profile_before_its_size(tmp_path: Path) -> None:
    """Phones and editors put ICC profiles (in 64 KB APP2 pieces) before the frame header: the size
    is found past the first 64 KB read, not mistaken for an unreadable file."""
    ok, data = cv2.imencode(".jpg", np.full((120, 160, 3), 128, np.uint8))
    assert ok
    piece = b"ICC_PROFILE\0" + b"\x01\x04" + b"\0" * 65000
    app2 = (b"\xff\xe2" + struct.pack(">H", len(piece) + 2) + piece) * 4
    path = tmp_path / "icc.jpg"
    path.write_bytes(data.tobytes()[:2] + app2 + data.tobytes()[2:])
    assert path.stat().st_size > 250_000
    assert read_image(path).shape == (120, 160, 3)
    with pytest.raises(ImageRefused, match="160x120"):
        read_image(path, 1000)


def test_a_repeated_folder_says_once_what_it_cannot_decode(tmp_path: Path) -> None:
    """A file whose header is fine but that the decoder refuses (32-bit float samples) was decoded
    again on every round of a repeated folder, and OpenCV's warning went to the log each time."""
    folder = tmp_path / "frames"
    folder.mkdir()
    assert cv2.imwrite(str(folder / "a_float.tiff"), np.zeros((8, 8), np.float32))
    (folder / "cat.bmp").write_bytes((IMAGES / "cat.bmp").read_bytes())
    proc = run_cli("run", "--model", DEFAULT_MODEL, "--source", folder, "--no-mqtt", "--max-frames", "20",
                   env={"EDGECAM_SPOOL_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 20  # twenty rounds of the folder, each past the bad file
    said = [line for line in proc.stderr.splitlines() if "a_float.tiff" in line or "WARN" in line]
    assert len(said) == 1 and "skipped" in said[0], proc.stderr
    # explain says it in its own line only, without OpenCV's.
    proc = run_cli("explain", "--model", DEFAULT_MODEL, folder / "a_float.tiff", "-o", tmp_path / "out")
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"edgecam: {folder / 'a_float.tiff'}: cannot read as an image (unsupported or corrupt file)",
        "edgecam: 1 of 1 inputs failed"], proc.stderr
