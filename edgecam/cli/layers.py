"""`edgecam layers`: each stage's activation over one image, in one picture."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgecam.cli.common import load_classifier
from edgecam.core.errors import EdgecamError
from edgecam.core.images import read_image
from edgecam.core.labels import class_id, short_label
from edgecam.core.layers import picture, stage_interpreter, stage_tensors, stages
from edgecam.core.methods import make
from edgecam.core.preprocess import to_input
from edgecam.core.render import write_image
from edgecam.device.workers import scorer_for


def run_layers(args: argparse.Namespace) -> int:
    if args.cls is None:
        # They shape the class maps only; without --class they would be ignored without a word.
        given = [f"--{k}" for k in ("channels", "workers") if getattr(args, k) is not None]
        if given:
            raise EdgecamError(f"{given[0]} applies only with --class (the class maps at every stage)")
    clf = load_classifier(args)
    cls = class_id(args.cls, clf.labels) if args.cls is not None else None
    frame = read_image(args.image, args.max_pixels)
    found = stages(clf)
    x, _ = to_input(frame, clf.input)
    tensors = stage_tensors(clf, stage_interpreter(clf, found), x, found)
    maps = [a.mean(axis=-1) for a in tensors]
    class_maps = None
    label = ""
    if cls is not None:
        # Score-CAM at every stage, from the activations already in hand: how the evidence forms.
        inf = clf.infer(x)
        label = short_label(clf.labels[cls])
        class_maps = []
        with scorer_for(clf, args.workers) as scorer:
            for k, t in enumerate(tensors, 1):
                method = make("scorecam", stage=str(k), channels=args.channels)
                made = method.maps_of(clf, x, inf, t, [cls], scorer)  # type: ignore[attr-defined]
                class_maps.append(made.maps[0])
                print(f"edgecam: scorecam: {made.detail}, {made.inferences} inferences ({made.how}), "
                      f"{made.seconds * 1e3:.0f} ms", file=sys.stderr)
    out_dir: Path = args.out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{Path(args.image).stem}.layers.jpg"
        write_image(target, picture(frame, found, maps, class_maps=class_maps, class_label=label))
    except OSError as exc:
        raise EdgecamError(f"{out_dir}: cannot write ({exc.strerror or exc})") from None
    info = [{"tensor": s.index, "name": s.name, "shape": list(s.shape)} for s in found]
    if class_maps is not None:
        for row, m in zip(info, class_maps, strict=True):
            row["class_map"] = np.round(m, 6).tolist()
    if args.json:
        obj = {"image": str(args.image), "picture": str(target), "stages": info}
        if cls is not None:
            obj["class"] = {"id": cls, "label": clf.labels[cls]}
        print(json.dumps(obj))
    else:
        for s in found:
            print(f"#{s.index:<4d} {'x'.join(map(str, s.shape[1:])):>12s}  {s.name}")
        print(f"{target}: {len(found)} stages", file=sys.stderr)
    return 0
