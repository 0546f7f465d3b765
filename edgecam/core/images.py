"""Image files on disk: which files count as images, and walking files and folders."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


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
