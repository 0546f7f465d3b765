"""`edgecam explain`: classify image files and explain each with CAMs, offline."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from . import cam as cam_math
from .errors import EdgecamError
from .labels import class_id
from .model import Classifier, Inference
from .occlusion import occlusion_maps
from .preprocess import Box, to_input
from .render import overlay, write_image


@dataclass
class Explanation:
    """One frame's prediction and maps: what explain prints and the daemon publishes."""

    top: list[tuple[int, str, float]]  # (id, label, score), best first
    cam_ids: list[int]  # top-1 first, then the classes asked for
    cams: np.ndarray  # raw maps [len(cam_ids), H, W]
    box: Box
    view: np.ndarray | None = None  # the box of the frame, scaled down on the way to the model (BGR)


def explain_frame(
    clf: Classifier,
    frame_bgr: np.ndarray,
    top_k: int = 3,
    extra: list[int] | None = None,
    crop: bool = False,
    exact: bool = False,
    timing: dict[str, float] | None = None,
) -> Explanation:
    """Preprocess, one invoke(), top-k, and the CAMs of top-1 and `extra`, in one product.

    With `timing`, the milliseconds of each stage are stored in it: pre, infer, cam.
    """
    t0 = time.perf_counter()
    keep: dict = {}
    x, box = to_input(frame_bgr, clf.input, crop, exact, keep)
    t1 = time.perf_counter()
    inf = clf.infer(x)
    t2 = time.perf_counter()
    exp = explain_inference(clf, inf, box, top_k, extra, keep.get("view"))
    if timing is not None:
        t3 = time.perf_counter()
        timing.update(pre=(t1 - t0) * 1e3, infer=(t2 - t1) * 1e3, cam=(t3 - t2) * 1e3)
    return exp


def explain_inference(
    clf: Classifier,
    inf: Inference,
    box: Box,
    top_k: int = 3,
    extra: list[int] | None = None,
    view: np.ndarray | None = None,
) -> Explanation:
    """Top-k and the CAMs of top-1 and `extra` from one inference."""
    idx = cam_math.top_k(inf.scores, top_k)
    top = [(int(i), clf.labels[int(i)], float(inf.scores[i])) for i in idx]
    cam_ids = [top[0][0]] + [c for c in (extra or []) if c != top[0][0]]
    return Explanation(top, cam_ids, clf.cams(inf, cam_ids), box, view)


def to_json(image: str, model: str, exp: Explanation, labels: list[str]) -> dict[str, Any]:
    return {
        "image": image,
        "model": model,
        "top": [{"id": i, "label": lab, "score": round(s, 5)} for i, lab, s in exp.top],
        "cams": [
            {"id": c, "label": labels[c], "map": np.round(m, 5).tolist()}
            for c, m in zip(exp.cam_ids, exp.cams, strict=True)
        ],
    }


def _line(image: str, exp: Explanation) -> str:
    # ImageNet labels carry synonyms ("tabby, tabby cat"); the first reads best in a line.
    return f"{image}: " + " | ".join(f"{lab.split(',')[0]} {s:.2f}" for _, lab, s in exp.top)


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal and there is enough to do."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.on = total > 3 and sys.stderr.isatty()

    def step(self, done: int, name: str) -> None:
        if self.on:
            width = 24
            filled = width * done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {name[:40]:40s}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def run_explain(args: argparse.Namespace) -> int:
    from .cli import iter_images, load_classifier

    if args.top < 1:
        raise EdgecamError(f"--top {args.top}: must be at least 1")
    if args.patch < 1 or args.stride < 1:
        raise EdgecamError(f"--patch {args.patch} --stride {args.stride}: both must be at least 1 pixel")
    clf = load_classifier(args)
    extra = [class_id(c, clf.labels) for c in args.classes]
    if args.out:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgecamError(f"{args.out}: cannot create output directory ({exc.strerror or exc})") from None
    styles = ["blend", "dim"] if args.style == "both" else [args.style]
    wide = None
    if args.wide:
        from .wide import WideCam

        if args.crop:
            raise EdgecamError("--wide and --crop go against each other: --wide keeps the whole frame unsquashed")
        if args.method == "occlusion":
            raise EdgecamError("--wide works with --method cam only (occlusion runs on the square input)")
        wide = WideCam(clf)
    said = ""
    items = list(iter_images(args.images))
    progress = _Progress(len(items))
    failed = 0
    used: set[str] = set()
    for n, (path, problem) in enumerate(items, 1):
        progress.step(n - 1, path.name)
        frame = None if problem else cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            failed += 1
            progress.close()
            reason = problem or "cannot read as an image (unsupported or corrupt file)"
            print(f"edgecam: {path}: {reason}", file=sys.stderr)
            continue
        if wide is not None:
            exp = wide.explain(frame, args.top, extra)
            if wide.reason and wide.reason != said:
                said = wide.reason
                progress.close()
                print(f"edgecam: --wide: {wide.reason}; using the square input", file=sys.stderr)
        else:
            exp = explain_frame(clf, frame, args.top, extra, args.crop, args.exact_resize)
        if args.method == "occlusion":
            x, _ = to_input(frame, clf.input, args.crop, args.exact_resize)
            occ = occlusion_maps(clf, x, exp.cam_ids, args.patch, args.stride)
            exp.cams = occ.maps
            how = "one batched invoke()" if occ.batched else "one invoke() each"
            progress.close()
            print(f"edgecam: {path.name}: occlusion: {occ.positions[0]}x{occ.positions[1]} positions, "
                  f"{occ.inferences} inferences ({how}), {occ.seconds * 1e3:.0f} ms", file=sys.stderr)
        if args.out:
            stem = _unique(path.stem, used)
            for cid, m in zip(exp.cam_ids, exp.cams, strict=True):
                for style in styles:
                    target = args.out / f"{stem}.cam{cid}.{style}.{args.format}"
                    try:
                        write_image(target, overlay(frame, m, style, exp.box))
                    except OSError as exc:
                        raise EdgecamError(f"{target}: cannot write ({exc.strerror or exc})") from None
        progress.close()
        if args.json:
            obj = to_json(str(path), clf.name, exp, clf.labels)
            if args.method != "cam":  # the CAM's objects keep the schema they have always had
                obj["method"] = args.method
            print(json.dumps(obj), flush=True)
        else:
            print(_line(str(path), exp), flush=True)
    progress.close()
    if failed:
        print(f"edgecam: {failed} of {len(items)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}-{k}"
    used.add(name)
    return name
