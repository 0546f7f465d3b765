"""`edgecam evaluate`: how faithful is a map? Deletion and insertion curves, the pointing game.

Deletion: grey out the model's input in order of the map's importance, most important first, and
follow the class score; a faithful map makes it fall fast (a low area under the curve). Insertion:
start from a heavily blurred input and reveal it in the same order; a faithful map makes the score
rise fast (a high area). A random map is the baseline every real method must beat. With an object
mask: is the map's maximum on the object (pointing game), and what share of its positive energy
lies inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgecam.core.errors import EdgecamError
from edgecam.core.explain import explain_inference
from edgecam.core.model import Classifier
from edgecam.core.occlusion import grey, occlusion_maps
from edgecam.core.preprocess import to_input

METHODS = ("cam", "occlusion", "random")


@dataclass
class Score:
    image: str
    method: str
    cls: int
    label: str
    deletion: float
    insertion: float
    pointing: float | None = None
    energy: float | None = None


def saliency(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A grid map (CAM or occlusion) at the input's resolution."""
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def order(sal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices, most important first; ties (a flat map) broken at random, not in raster order."""
    jitter = rng.random(sal.size) * 1e-9 * (float(np.ptp(sal)) or 1.0)
    return np.argsort(-(sal.ravel() + jitter), kind="stable")


def curves(clf: Classifier, x: np.ndarray, cls: int, sal: np.ndarray, steps: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class score after removing (deletion) and revealing (insertion) 0, 1/steps, ..., 1 of the pixels."""
    _, h, w, c = x.shape
    idx = order(sal, rng)
    flat = x.reshape(h * w, c)
    fill = np.asarray(grey(clf.input)).astype(x.dtype)
    blurred = cv2.GaussianBlur(x[0].astype(np.float32), (0, 0), sigmaX=max(h, w) / 16).astype(x.dtype)
    blur_flat = blurred.reshape(h * w, c)
    deletion, insertion = [], []
    for k in range(steps + 1):
        n = round(k / steps * h * w)
        gone = flat.copy()
        gone[idx[:n]] = fill
        deletion.append(clf.infer(gone.reshape(1, h, w, c)).scores[cls])
        shown = blur_flat.copy()
        shown[idx[:n]] = flat[idx[:n]]
        insertion.append(clf.infer(shown.reshape(1, h, w, c)).scores[cls])
    return np.array(deletion), np.array(insertion)


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions of 0..1."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)) if hasattr(np, "trapezoid")
                 else np.trapz(curve, dx=1.0 / (len(curve) - 1)))


def pointing(sal: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(1.0 if the map's maximum is on the object else 0.0, share of positive energy inside the mask)."""
    y, x = np.unravel_index(int(np.argmax(sal)), sal.shape)
    hit = 1.0 if mask[y, x] else 0.0
    pos = np.maximum(sal, 0)
    total = float(pos.sum())
    return hit, (float(pos[mask].sum()) / total if total > 0 else 0.0)


def load_mask(masks: Path, image: Path, height: int, width: int) -> np.ndarray | None:
    for suffix in (".png", ".bmp", ".jpg"):
        path = masks / (image.stem + suffix)
        if path.exists():
            m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if m is None:
                raise EdgecamError(f"{path}: cannot read as a mask image")
            return cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) > 127
    return None


def evaluate_image(clf: Classifier, path: Path, methods: list[str], steps: int, seed: int,
                   masks: Path | None, patch: int, stride: int) -> list[Score]:
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise EdgecamError(f"{path}: cannot read as an image")
    x, box = to_input(frame, clf.input)
    _, h, w, _ = x.shape
    # The same input for the map and for the curves, prepared once.
    exp = explain_inference(clf, clf.infer(x), box, 1)
    cls = exp.top[0][0]
    mask = load_mask(masks, path, h, w) if masks else None
    out = []
    for method in methods:
        rng = np.random.default_rng(seed)
        if method == "cam":
            grid = exp.cams[0]
        elif method == "occlusion":
            grid = occlusion_maps(clf, x, [cls], patch, stride).maps[0]
        else:
            grid = rng.random(exp.cams[0].shape).astype(np.float32)
        sal = saliency(grid, h, w)
        deletion, insertion = curves(clf, x, cls, sal, steps, rng)
        score = Score(path.name, method, cls, clf.labels[cls], auc(deletion), auc(insertion))
        if mask is not None:
            score.pointing, score.energy = pointing(sal, mask)
        out.append(score)
    return out


def table(scores: list[Score]) -> str:
    head = (f"{'image':18s} {'method':10s} {'class':16s} {'deletion':>9s} {'insertion':>10s} {'pointing':>9s} "
            f"{'energy':>7s}")
    lines = [head, "-" * len(head)]

    def fmt(v: float | None, width: int) -> str:
        return f"{v:{width}.3f}" if v is not None else f"{'-':>{width}s}"

    for s in scores:
        lines.append(f"{s.image[:18]:18s} {s.method:10s} {s.label.split(',')[0][:16]:16s} {fmt(s.deletion, 9)} "
                     f"{fmt(s.insertion, 10)} {fmt(s.pointing, 9)} {fmt(s.energy, 7)}")
    lines.append("-" * len(head))
    for method, m in means(scores).items():
        lines.append(f"{'mean':18s} {method:10s} {'':16s} {fmt(m['deletion'], 9)} {fmt(m['insertion'], 10)} "
                     f"{fmt(m['pointing'], 9)} {fmt(m['energy'], 7)}")
    lines.append("deletion: lower is better; insertion, pointing, energy: higher is better")
    return "\n".join(lines)


def means(scores: list[Score]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for method in dict.fromkeys(s.method for s in scores):
        group = [s for s in scores if s.method == method]
        row: dict[str, float | None] = {}
        for key in ("deletion", "insertion", "pointing", "energy"):
            values = [getattr(s, key) for s in group if getattr(s, key) is not None]
            row[key] = float(np.mean(values)) if values else None
        out[method] = row
    return out
