"""`edgecam layers`: each stage's activation over one image, in one picture."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2

from edgecam.cli.common import load_classifier
from edgecam.core.errors import EdgecamError
from edgecam.core.layers import activations, picture, stages
from edgecam.core.render import write_image


def run_layers(args: argparse.Namespace) -> int:
    clf = load_classifier(args)
    frame = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if frame is None:
        raise EdgecamError(f"{args.image}: cannot read as an image")
    found = stages(clf)
    maps = activations(clf, frame, found)
    out_dir: Path = args.out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{Path(args.image).stem}.layers.jpg"
        write_image(target, picture(frame, found, maps))
    except OSError as exc:
        raise EdgecamError(f"{out_dir}: cannot write ({exc.strerror or exc})") from None
    info = [{"tensor": s.index, "name": s.name, "shape": list(s.shape)} for s in found]
    if args.json:
        print(json.dumps({"image": str(args.image), "picture": str(target), "stages": info}))
    else:
        for s in found:
            print(f"#{s.index:<4d} {'x'.join(map(str, s.shape[1:])):>12s}  {s.name}")
        print(f"{target}: {len(found)} stages", file=sys.stderr)
    return 0
