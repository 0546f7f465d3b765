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
from edgecam.core.images import DEFAULT_MAX_PIXELS, read_image
from edgecam.core.labels import short_label
from edgecam.core.methods import Method, Scorer, names
from edgecam.core.methods.base import grey
from edgecam.core.model import Classifier
from edgecam.core.preprocess import to_input

# Scored on the model's square input; by default the ones that cost at most tens of inferences a map.
METHODS = tuple(names(square_input=True))
DEFAULT_METHODS = tuple(names(("frame", "map"), square_input=True))


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
    ms: float = 0.0  # the method's time for this map (the prediction's inference not included)
    inferences: int = 1  # the model runs it took, the prediction's included


def saliency(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A grid map (CAM or occlusion) at the input's resolution."""
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def order(sal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices, most important first; ties (a flat map) broken at random, not in raster order."""
    jitter = rng.random(sal.size) * 1e-9 * (float(np.ptp(sal)) or 1.0)
    return np.argsort(-(sal.ravel() + jitter), kind="stable")


def curves(clf: Classifier, x: np.ndarray, cls: int, sal: np.ndarray, steps: int,
           rng: np.random.Generator, scorer: Scorer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class score after removing (deletion) and revealing (insertion) 0, 1/steps, ..., 1 of the pixels."""
    scorer = scorer or Scorer(clf)
    _, h, w, c = x.shape
    idx = order(sal, rng)
    flat = x.reshape(h * w, c)
    fill = np.asarray(grey(clf.input)).astype(x.dtype)
    blurred = cv2.GaussianBlur(x[0].astype(np.float32), (0, 0), sigmaX=max(h, w) / 16).astype(x.dtype)
    blur_flat = blurred.reshape(h * w, c)
    batch = np.empty((2 * (steps + 1), h * w, c), x.dtype)
    for k in range(steps + 1):
        n = round(k / steps * h * w)
        batch[2 * k] = flat
        batch[2 * k, idx[:n]] = fill
        batch[2 * k + 1] = blur_flat
        batch[2 * k + 1, idx[:n]] = flat[idx[:n]]
    scores = scorer(batch.reshape(-1, h, w, c))[:, cls]
    return scores[0::2].copy(), scores[1::2].copy()


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


def evaluate_image(clf: Classifier, path: Path, methods: list[Method], steps: int, seed: int,
                   masks: Path | None, scorer: Scorer | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Score]:
    frame = read_image(path, max_pixels)
    # The same input for the maps and for the curves, prepared once.
    x, _ = to_input(frame, clf.input)
    _, h, w, _ = x.shape
    inf = clf.infer(x)
    cls = int(np.argmax(inf.scores))
    mask = load_mask(masks, path, h, w) if masks else None
    out = []
    for method in methods:
        made = method.maps(clf, x, inf, [cls], scorer)
        sal = saliency(made.maps[0], h, w)
        deletion, insertion = curves(clf, x, cls, sal, steps, np.random.default_rng(seed), scorer)
        score = Score(path.name, method.name, cls, clf.labels[cls], auc(deletion), auc(insertion),
                      ms=made.seconds * 1e3, inferences=made.inferences)
        if mask is not None:
            score.pointing, score.energy = pointing(sal, mask)
        out.append(score)
    return out


def table(scores: list[Score]) -> str:
    head = (f"{'image':18s} {'method':10s} {'class':16s} {'deletion':>9s} {'insertion':>10s} {'ms':>8s} "
            f"{'pointing':>9s} {'energy':>7s}")
    lines = [head, "-" * len(head)]

    def fmt(v: float | None, width: int) -> str:
        return f"{v:{width}.3f}" if v is not None else f"{'-':>{width}s}"

    for s in scores:
        lines.append(f"{s.image[:18]:18s} {s.method:10s} {short_label(s.label)[:16]:16s} {fmt(s.deletion, 9)} "
                     f"{fmt(s.insertion, 10)} {s.ms:8.1f} {fmt(s.pointing, 9)} {fmt(s.energy, 7)}")
    lines.append("-" * len(head))
    for method, m in means(scores).items():
        lines.append(f"{'mean':18s} {method:10s} {'':16s} {fmt(m['deletion'], 9)} {fmt(m['insertion'], 10)} "
                     f"{m['ms'] or 0.0:8.1f} {fmt(m['pointing'], 9)} {fmt(m['energy'], 7)}")
    lines.append("deletion: lower is better; insertion, pointing, energy: higher is better; "
                 "ms: the map's time, the prediction's inference not included")
    return "\n".join(lines)


def means(scores: list[Score]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for method in dict.fromkeys(s.method for s in scores):
        group = [s for s in scores if s.method == method]
        row: dict[str, float | None] = {}
        for key in ("deletion", "insertion", "pointing", "energy", "ms"):
            values = [getattr(s, key) for s in group if getattr(s, key) is not None]
            row[key] = float(np.mean(values)) if values else None
        out[method] = row
    return out
