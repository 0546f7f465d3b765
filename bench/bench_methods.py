"""Benchmark: time per map of each explanation method, one worker against several, side by side.

    .venv/bin/python bench/bench_methods.py [--model PATH] [--images DIR] [--workers N] [--rounds R]

For each image and method the variants run one after the other (interleaved, so load from other
processes hits each alike): `1 worker` is the classifier's own interpreter (its --threads), `N workers`
is N interpreters of one thread each in N threads. Prints the bare invoke() median, then per method
the inferences per map, the median ms per map of each variant, their ratio, and the N workers'
CPU time over wall time (near N when the interpreters really run side by side; on a machine busy with
other work the wall-time ratio cannot show it, the CPU ratio still does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgecam.core.images import iter_images  # noqa: E402
from edgecam.core.methods import Scorer, make  # noqa: E402
from edgecam.core.model import Classifier  # noqa: E402
from edgecam.core.preprocess import to_input  # noqa: E402
from edgecam.device.workers import ThreadScorer, default_workers  # noqa: E402

SHARED = ROOT.parent / "shared"
METHODS = ("cam", "occlusion", "lime", "scorecam", "rise", "random")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models/tf2_mobilenet_v2_1.0_224_ptq.tflite")
    ap.add_argument("--labels", type=Path, default=SHARED / "models/imagenet_labels.txt")
    ap.add_argument("--images", type=Path, default=SHARED / "images")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--threads", type=int, default=2, help="the classifier's own interpreter threads")
    ap.add_argument("--rounds", type=int, default=1, help="passes over the images")
    ap.add_argument("--method", action="append", choices=METHODS)
    args = ap.parse_args()
    clf = Classifier(args.model, args.labels, num_threads=args.threads)
    methods = args.method or list(METHODS)
    inputs = [to_input(cv2.imread(str(p)), clf.input)[0] for p, problem in iter_images([args.images]) if not problem]
    one = Scorer(clf)
    many = ThreadScorer(clf, args.workers)
    invoke = []
    for _ in range(50):
        for x in inputs[:2]:
            t = time.perf_counter()
            clf.infer(x)
            invoke.append((time.perf_counter() - t) * 1e3)
    bare = statistics.median(invoke)
    print(f"{clf.name}: bare invoke() median {bare:.2f} ms ({args.threads} threads); {len(inputs)} images, "
          f"{args.rounds} round(s); {args.workers} workers of 1 thread each")
    print(f"{'method':10s} {'inferences':>10s} {'1 worker ms':>12s} {f'{args.workers} workers ms':>14s} {'ratio':>6s}"
          f" {'ms/inference':>13s} {'cpu/wall':>9s}")
    for name in methods:
        method = make(name)
        times: dict[str, list[float]] = {"one": [], "many": []}
        cpu = wall = 0.0
        runs = 0
        for _ in range(args.rounds):
            for x in inputs:
                inf = clf.infer(x)
                cls = [int(inf.scores.argmax())]
                for key, scorer in (("one", one), ("many", many)):
                    c0 = time.process_time()
                    made = method.maps(clf, x, inf, cls, scorer)
                    if key == "many":
                        cpu += time.process_time() - c0
                        wall += made.seconds
                    times[key].append(made.seconds * 1e3)
                    runs = made.inferences
        a, b = statistics.median(times["one"]), statistics.median(times["many"])
        per = b / max(1, runs - 1)
        print(f"{name:10s} {runs:10d} {a:12.1f} {b:14.1f} {a / b if b else float('nan'):6.2f} {per:13.2f} "
              f"{cpu / wall if wall else float('nan'):9.2f}")
    many.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
