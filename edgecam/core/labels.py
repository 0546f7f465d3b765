"""Class labels: a text file, one label a line (or `id label` lines, as pycoral writes them)."""

from __future__ import annotations

import re
from pathlib import Path

from edgecam.core.errors import EdgecamError, shown

_NUMBERED = re.compile(r"^\s*(\d+)[\s:]+(.*\S)\s*$")


def read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgecamError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgecamError(f"{path}: cannot read labels file ({exc})") from None
    return parse_labels(text, str(path))


def parse_labels(text: str, where: str) -> list[str]:
    """Labels from a file's text: one a line, or `id label` lines."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise EdgecamError(f"{where}: labels file is empty")
    numbered = [_NUMBERED.match(line) for line in lines]
    if all(numbered):
        table = {int(m.group(1)): m.group(2) for m in numbered if m}
        return [table.get(i, f"class {i}") for i in range(max(table) + 1)]
    return [line.strip() for line in lines]


def fit_labels(labels: list[str] | None, num_classes: int, source: str = "labels") -> list[str]:
    """Labels indexed by model output id.

    A 1001-class ImageNet model has `background` at id 0; its labels file may list
    1001 lines (with background) or 1000 (without): both are accepted. A 1000-class model
    (torchvision's) takes the 1001-line file too, its leading background dropped.
    """
    if labels is None:
        return [f"class {i}" for i in range(num_classes)]
    if len(labels) == num_classes:
        return labels
    if len(labels) == num_classes - 1:
        return ["background", *labels]
    if len(labels) == num_classes + 1 and labels[0].strip().lower() in ("background", "???", "__background__"):
        return labels[1:]
    raise EdgecamError(
        f"{source}: has {len(labels)} labels, the model has {num_classes} classes "
        f"(expected {num_classes}, or {num_classes - 1} without a background class)"
    )


def class_id(query: str | int, labels: list[str]) -> int:
    """A class by id or by name (exact, then case-insensitive, then a unique comma-separated synonym)."""
    text = str(query).strip()
    # isdigit() alone admits '²' and '①', which int() refuses.
    if isinstance(query, int) or (text.isascii() and text.isdigit()):
        i = int(query)
        if not 0 <= i < len(labels):
            raise EdgecamError(f"class id {shown(i)} is out of range (0..{len(labels) - 1})")
        return i
    q = str(query).strip()
    if q in labels:
        return labels.index(q)
    low = q.lower()
    exact = [i for i, lab in enumerate(labels) if lab.lower() == low]
    if exact:
        return exact[0]
    # ImageNet labels list synonyms: "tabby, tabby cat".
    syn = [i for i, lab in enumerate(labels) if low in (s.strip().lower() for s in lab.split(","))]
    if len(syn) == 1:
        return syn[0]
    if len(syn) > 1:
        raise EdgecamError(f"class {shown(q)} is ambiguous: " + ", ".join(f"{i} {labels[i]!r}" for i in syn[:5]))
    raise EdgecamError(f"class {shown(q)} is not a label of this model")


def short_label(label: str) -> str:
    """The first synonym: ImageNet's labels list several ("hotdog, hot dog, red hot") and the first
    reads best in a line. (Home Assistant's state template in device/discovery.py applies the same
    rule on its side, and the dashboard page in JavaScript.)"""
    return label.split(",")[0].strip() or label
