"""What several commands share: loading the classifier from the model flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Sequence

from edgecam.core.errors import EdgecamError
from edgecam.core.manifest import resolve
from edgecam.core.methods import check_options
from edgecam.core.model import Classifier, HeadNames
from edgecam.core.normalization import normalization


def check_seed(args: argparse.Namespace) -> None:
    """The random methods' and evaluate's generator takes no negative seed (numpy raises)."""
    if args.seed is not None and args.seed < 0:
        raise EdgecamError(f"--seed {args.seed}: must be 0 or more")


def check_method_options(args: argparse.Namespace, chosen: Sequence[str], own: Collection[str] = ()) -> None:
    """The method options given (cli's method option group) against the methods chosen; `own`: those
    the command itself uses whatever the method (evaluate's --seed)."""
    check_options(chosen, {k: getattr(args, k) for k in args.method_options if k not in own})


def load_classifier(args: argparse.Namespace, model: str | None = None) -> Classifier:
    if bool(args.feature_tensor) != bool(args.weights_tensor):
        raise EdgecamError("--feature-tensor and --weights-tensor go together")
    if args.threads is None:
        env = os.environ.get("EDGECAM_THREADS", "2")
        if not env.strip().isdigit():
            raise EdgecamError(f"EDGECAM_THREADS={env!r} is not a whole number")
        args.threads = int(env)
    if args.threads < 1 or args.threads > 64:
        raise EdgecamError(f"--threads {args.threads} is out of range (1..64)")
    stated = None
    if args.input_mean is not None or args.input_std is not None:
        stated = normalization(args.input_mean, args.input_std, "flag", "--input-mean/--input-std")
    local = resolve(model or args.model, args.labels)
    names = HeadNames(args.feature_tensor, args.weights_tensor, args.bias_tensor) if args.feature_tensor else None
    clf = Classifier(local.path, local.labels, num_threads=args.threads, name=local.name, head_names=names,
                     normalization=stated or local.normalization)
    for warning in clf.warnings:
        print(f"edgecam: warning: {clf.path.name}: {warning}", file=sys.stderr)
    return clf
