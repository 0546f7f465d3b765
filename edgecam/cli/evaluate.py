"""`edgecam evaluate`: deletion, insertion and the pointing game over image files."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from edgecam.cli.common import check_method_options, check_seed, load_classifier
from edgecam.core.errors import EdgecamError
from edgecam.core.evaluate import DEFAULT_METHODS, Score, evaluate_image, means, table
from edgecam.core.images import iter_images
from edgecam.core.methods import Method, Scorer, make
from edgecam.core.model import Classifier
from edgecam.device.workers import scorer_for


def run_evaluate(args: argparse.Namespace) -> int:
    check_seed(args)
    chosen = list(dict.fromkeys(args.method or DEFAULT_METHODS))
    check_method_options(args, chosen, own={"seed"})  # the seed breaks the curves' ties too
    methods = [make(name, **vars(args)) for name in chosen]
    if not 2 <= args.steps <= 200:
        raise EdgecamError(f"--steps {args.steps}: must be from 2 to 200")
    if args.masks and not args.masks.is_dir():
        raise EdgecamError(f"--masks {args.masks}: not a directory")
    clf = load_classifier(args)
    with scorer_for(clf, args.workers) as scorer:
        return _evaluate_all(args, clf, methods, scorer)


def _evaluate_all(args: argparse.Namespace, clf: Classifier, methods: list[Method], scorer: Scorer) -> int:
    scores: list[Score] = []
    failed = 0
    for path, problem in iter_images(args.images):
        if problem:
            print(f"edgecam: {path}: {problem}", file=sys.stderr)
            failed += 1
            continue
        try:
            scores += evaluate_image(clf, path, methods, args.steps, args.seed or 0, args.masks, scorer,
                                     max_pixels=args.max_pixels)
        except EdgecamError as exc:
            print(f"edgecam: {exc}", file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps({"model": clf.name, "steps": args.steps, "images": [asdict(s) for s in scores],
                          "mean": means(scores)}))
    elif scores:
        print(table(scores))
    return 1 if failed else 0
