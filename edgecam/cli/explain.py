"""`edgecam explain`: classify image files and explain each with CAMs, offline."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from edgecam.cli.common import check_method_options, check_seed, load_classifier
from edgecam.core.errors import EdgecamError
from edgecam.core.explain import Explanation, explain_frame, to_json
from edgecam.core.images import ImageRefused, iter_images, read_image
from edgecam.core.labels import class_id, short_label
from edgecam.core.methods import REGISTRY, Method, Scorer, make, names
from edgecam.core.model import Classifier
from edgecam.core.preprocess import crop_box, resize_path
from edgecam.core.render import overlay, write_image
from edgecam.device.workers import scorer_for


def _line(image: str, exp: Explanation) -> str:
    # ImageNet labels carry synonyms ("tabby, tabby cat"); the first reads best in a line.
    return f"{image}: " + " | ".join(f"{short_label(lab)} {s:.2f}" for _, lab, s in exp.top)


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
    if args.top < 1:
        raise EdgecamError(f"--top {args.top}: must be at least 1")
    check_seed(args)
    if args.wide:
        if args.method not in ("cam", "wide"):
            raise EdgecamError(f"--wide works with --method cam only ({args.method} runs on the square input)")
        args.method = "wide"
    if args.method == "wide" and args.crop:
        raise EdgecamError("--wide and --crop go against each other: --wide keeps the whole frame unsquashed")
    check_method_options(args, [args.method])
    if args.workers is not None and REGISTRY[args.method].cost == "frame":
        raise EdgecamError(f"--workers applies to the methods that run more inferences, --method "
                           f"{', '.join(names(('map', 'many')))}; not to {args.method}")
    method = make(args.method, **vars(args))
    clf = load_classifier(args)
    scorer = scorer_for(clf, args.workers) if method.cost != "frame" else None
    try:
        return _explain_all(args, clf, method, scorer)
    finally:
        if scorer is not None:
            scorer.close()


def _explain_all(args: argparse.Namespace, clf: Classifier, method: Method, scorer: Scorer | None) -> int:
    extra = [class_id(c, clf.labels) for c in args.classes]
    if args.out:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EdgecamError(f"{args.out}: cannot create output directory ({exc.strerror or exc})") from None
    styles = ["blend", "dim"] if args.style == "both" else [args.style]
    said = ""
    items = list(iter_images(args.images))
    progress = _Progress(len(items))
    failed = 0
    used: set[str] = set()
    for n, (path, problem) in enumerate(items, 1):
        progress.step(n - 1, path.name)
        try:
            if problem:
                raise ImageRefused(f"{path}: {problem}")
            frame = read_image(path, args.max_pixels)
        except ImageRefused as exc:
            failed += 1
            progress.close()
            print(f"edgecam: {exc}", file=sys.stderr)
            continue
        exp = explain_frame(clf, frame, args.top, extra, args.crop, args.exact_resize or None, method=method,
                            scorer=scorer)
        if method.notice and method.notice != said:
            said = method.notice
            progress.close()
            print(f"edgecam: --method {method.name}: {method.notice}; using the square input", file=sys.stderr)
        made = exp.made
        if made is not None and method.cost != "frame":
            progress.close()
            how = f" ({made.how})" if made.how else ""
            detail = f"{made.detail}, " if made.detail else ""
            print(f"edgecam: {path.name}: {method.name}: {detail}{made.inferences} inferences{how}, "
                  f"{made.seconds * 1e3:.0f} ms", file=sys.stderr)
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
            obj["input"] = {**clf.input_info(), "resize": _resize_used(clf, frame, args)}
            print(json.dumps(obj), flush=True)
        else:
            print(_line(str(path), exp), flush=True)
    progress.close()
    if failed:
        print(f"edgecam: {failed} of {len(items)} inputs failed", file=sys.stderr)
    return 1 if failed else 0


def _resize_used(clf: Classifier, frame: np.ndarray, args: argparse.Namespace) -> str:
    if args.exact_resize:
        return "exact (--exact-resize)"
    box = crop_box(frame.shape[0], frame.shape[1], clf.input.height, clf.input.width, args.crop)
    return resize_path(box[3] - box[1], box[2] - box[0], clf.input.height, clf.input.width) + " (auto)"


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}-{k}"
    used.add(name)
    return name
