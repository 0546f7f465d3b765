"""Image files on disk: which files count as images, and walking files and folders."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from edgecam.core.errors import EdgecamError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def quiet_opencv() -> None:
    """OpenCV's own WARN lines on stderr would double the one-line errors (and repeat with each
    file they are about)."""
    with contextlib.suppress(AttributeError):
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def image_files(folder: Path) -> list[Path]:
    """The folder's image files in name order."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def iter_images(inputs: Sequence[str]) -> Iterator[tuple[Path, str | None]]:
    """Image files from files and directories; a path that is neither comes with its error."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = image_files(p)
            if not files:
                yield p, "no image files in this directory"
            for f in files:
                yield f, None
        elif p.exists():
            yield p, None
        else:
            yield p, "no such file or directory"


# 25 megapixels: a 24 MP camera's photograph passes; decoded as BGR it is 75 MB. A header that
# claims more is refused before decoding (a 1 MB PNG can claim 20000x20000, 1.2 GB decoded).
DEFAULT_MAX_PIXELS = 25_000_000


class ImageRefused(EdgecamError):
    """An image file that is not decoded: too large, of an unknown format, or unreadable."""


def image_size(head: bytes, read_at: Callable[[int, int], bytes] | None = None) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, BMP, WebP, TIFF or PNM file, as the
    decoder will see them; None when the format is not one of these or the header is cut short.
    `read_at(offset, n)` reads further into the file (a TIFF's directory may be at its end)."""
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head.startswith(b"\xff\xd8"):
            return _jpeg_size(read_at or (lambda at, n: head[at : at + n]))
        if head.startswith(b"BM"):
            header = struct.unpack("<I", head[14:18])[0]
            if header == 12:  # BITMAPCOREHEADER
                w, h = struct.unpack("<HH", head[18:22])
                return w, h
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)  # a negative height is a top-down bitmap
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp_size(head)
        if head[:4] in (b"II*\0", b"MM\0*"):
            return _tiff_size(head, read_at or (lambda at, n: head[at : at + n]))
        if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2:
            return _pnm_size(head)
    except struct.error:
        return None
    return None


def _jpeg_size(read_at: Callable[[int, int], bytes]) -> tuple[int, int] | None:
    """The frame size from the SOF segment, skipping every segment before it by its length: APPn
    segments (EXIF and its thumbnail, ICC profiles in 64 KB pieces) can hold far more than a header."""
    pos = 2
    for _ in range(100_000):
        marker = read_at(pos, 4)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            pos += 1
            continue
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:
            pos += 2
            continue
        if len(marker) < 4:
            return None
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", read_at(pos + 5, 4))
            return w, h
        pos += 2 + struct.unpack(">H", marker[2:4])[0]
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_size(head: bytes, read_at: Callable[[int, int], bytes]) -> tuple[int, int] | None:
    e = "<" if head[:2] == b"II" else ">"
    ifd = struct.unpack(e + "I", head[4:8])[0]
    count = struct.unpack(e + "H", read_at(ifd, 2))[0]
    entries = read_at(ifd + 2, 12 * count)
    found: dict[int, int] = {}
    for i in range(count):
        tag, kind = struct.unpack(e + "HH", entries[12 * i : 12 * i + 4])
        if tag in (256, 257):
            value = entries[12 * i + 8 : 12 * i + 12]
            found[tag] = struct.unpack(e + ("H" if kind == 3 else "I"), value[:2] if kind == 3 else value)[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(head: bytes) -> tuple[int, int] | None:
    fields: list[int] = []
    for line in head[2:].split(b"\n"):
        for word in line.split(b"#")[0].split():
            if not word.isdigit():
                return None
            fields.append(int(word))
            if len(fields) == 2:
                return fields[0], fields[1]
    return None


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image as a BGR array, its size checked against `max_pixels` from its header first."""
    try:
        with path.open("rb") as f:

            def read_at(at: int, n: int) -> bytes:
                f.seek(at)
                return f.read(n)

            head = f.read(1 << 16)  # JPEG's APPn segments (an EXIF thumbnail) can come before the size
            size = image_size(head, read_at)
    except OSError as exc:
        raise ImageRefused(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size is None:
        # Not JPEG, PNG, BMP, WebP, TIFF or PNM by its first bytes: not decoded, since its size is unknown.
        raise ImageRefused(f"{path}: cannot read as an image (unsupported or corrupt file)")
    w, h = size
    if w * h > max_pixels:
        raise ImageRefused(
            f"{path}: {w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} "
            "(not decoded; raise the pixel limit to accept it)"
        )
    quiet_opencv()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageRefused(f"{path}: cannot read as an image (unsupported or corrupt file)")
    return image
