"""Benchmark: bare invoke() against the whole explain pipeline per 1280x720 frame.

    .venv/bin/python bench/bench_pipeline.py [--model PATH] [--frame IMAGE] [--rounds N]

Measures side by side in one run, interleaved round by round so that load from
other processes hits every variant alike, and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecam.core import cam as cam_math  # noqa: E402
from edgecam.core.explain import explain_frame  # noqa: E402
from edgecam.core.model import Classifier  # noqa: E402
from edgecam.core.preprocess import to_input  # noqa: E402

SHARED = ROOT.parent / "shared"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models/tf2_mobilenet_v2_1.0_224_ptq.tflite")
    ap.add_argument("--labels", type=Path, default=SHARED / "models/imagenet_labels.txt")
    ap.add_argument("--frame", type=Path, default=SHARED / "images/cat_720p.jpg")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    clf = Classifier(args.model, args.labels, num_threads=args.threads)
    frame = cv2.imread(str(args.frame))
    if frame is None:
        print(f"cannot read {args.frame}", file=sys.stderr)
        return 2
    x, _ = to_input(frame, clf.input)
    it = clf.interpreter
    inp = clf._input_index

    def bare() -> None:
        it.set_tensor(inp, x)
        it.invoke()

    def pipeline() -> None:
        explain_frame(clf, frame, top_k=3)

    def pre_fast() -> None:
        to_input(frame, clf.input)

    def pre_area() -> None:
        to_input(frame, clf.input, exact=True)

    inf = clf.infer(x)

    def cam_only() -> None:
        cam_math.top_k(inf.scores, 3)
        clf.cams(inf, [int(np.argmax(inf.scores))])

    variants: dict[str, Callable[[], None]] = {
        "bare invoke()": bare,
        "pipeline (pre+invoke+top-k+CAM)": pipeline,
        "  preprocess, fast resize": pre_fast,
        "  preprocess, INTER_AREA": pre_area,
        "  top-k + CAM": cam_only,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        for _ in range(20):
            fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model {args.model.name}, runtime {clf.runtime}, {args.threads} threads, "
        f"frame {frame.shape[1]}x{frame.shape[0]}, {args.rounds} rounds, OpenCV {cv2.__version__}"
    )
    for name, m in med.items():
        print(f"{name:34s} median {m:7.3f} ms")
    ratio = med["pipeline (pre+invoke+top-k+CAM)"] / med["bare invoke()"]
    print(f"pipeline / bare invoke(): {ratio:.2f}x (target <= 1.30)")
    print(f"INTER_AREA / fast resize: {med['  preprocess, INTER_AREA'] / med['  preprocess, fast resize']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
