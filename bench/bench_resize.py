"""Benchmark: does the resize path keep the model's answers, and what does each path cost?

    .venv/bin/python bench/bench_resize.py [--rounds N]

Every shared model (../shared/models and ../shared/models/more, the embedding extractor aside) on
every shared photograph, scaled to 640x480, 1280x720 and 1920x1080 as a camera would deliver it.
Each frame goes to the model three ways: plain INTER_AREA (the reference), the fast path, and the
default (resize_path's choice). Reported per model and frame size: top-1 agreement with INTER_AREA
(a near tie, where INTER_AREA's top two are within 0.03, is counted apart) and the largest change
of the reference top-1 class's score. Then the cost of each path, median milliseconds per frame,
measured side by side in interleaved rounds.
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

from edgecam.core.model import Classifier  # noqa: E402
from edgecam.core.normalization import normalization  # noqa: E402
from edgecam.core.preprocess import InputSpec, resize_path, to_input  # noqa: E402

SHARED = ROOT.parent / "shared"
M, MORE = SHARED / "models", SHARED / "models" / "more"
SIZES = [(640, 480), (1280, 720), (1920, 1080)]
NEAR_TIE = 0.03
IMAGENET = normalization("123.675,116.28,103.53", "58.395,57.12,57.375", "bench")
MODELS = [
    (M / "tf2_mobilenet_v2_1.0_224_ptq.tflite", None),
    (M / "mobilenet_v2_1.0_224_quant.tflite", None),
    (M / "mobilenet_v1_0.25_128_quant.tflite", None),
    (MORE / "mlperf_tiny_resnet8_cifar10_int8.tflite", None),
    (MORE / "mlperf_tiny_resnet8_cifar10_float.tflite", normalization(0, 1, "bench")),
    (MORE / "mlperf_tiny_vww_96_int8.tflite", None),
    (MORE / "person_detect_grayscale_int8.tflite", None),
    (MORE / "pytorch_mobilenet_v2_quantized_1x3x224x224.tflite", IMAGENET),
    (MORE / "mobilenet_v1_0.25_224_1_metadata_1.tflite", None),
    (MORE / "automl_labeler_model.tflite", None),
]


def frames() -> dict[tuple[int, int], list[np.ndarray]]:
    photos = [cv2.imread(str(p)) for p in sorted((SHARED / "images").iterdir()) if p.suffix in (".bmp", ".jpg")]
    return {size: [cv2.resize(p, size, interpolation=cv2.INTER_CUBIC) for p in photos] for size in SIZES}


def agreement(clf: Classifier, shots: list[np.ndarray], exact: bool | None) -> tuple[int, int, int, float]:
    """(agree, near ties that flipped, real flips, largest change of the reference top-1 score)."""
    agree = near = flips = 0
    worst = 0.0
    for frame in shots:
        ref = clf.infer(to_input(frame, clf.input, exact=True)[0]).scores
        got = clf.infer(to_input(frame, clf.input, exact=exact)[0]).scores
        top = int(np.argmax(ref))
        worst = max(worst, abs(float(got[top] - ref[top])))
        if int(np.argmax(got)) == top:
            agree += 1
        elif float(np.diff(np.sort(ref)[-2:])[0]) < NEAR_TIE:
            near += 1
        else:
            flips += 1
    return agree, near, flips, worst


def _cell(a: tuple[int, int, int, float], n: int) -> str:
    ties = f" (+{a[1]} near tie{'s' if a[1] > 1 else ''})" if a[1] else ""
    return f"{a[0]}/{n}{ties}"


def costs(spec: InputSpec, frame: np.ndarray, rounds: int) -> dict[str, float]:
    variants: dict[str, Callable[[], object]] = {
        "INTER_AREA": lambda: to_input(frame, spec, exact=True),
        "fast": lambda: to_input(frame, spec, exact=False),
        "default": lambda: to_input(frame, spec),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100, help="timing rounds per input size and frame size")
    args = ap.parse_args()
    shots = frames()
    print(f"OpenCV {cv2.__version__}; {len(shots[SIZES[0]])} photographs at each size; near tie: INTER_AREA's "
          f"top two within {NEAR_TIE}")
    print()
    print("| model | input | frame | default path | default: top-1 as INTER_AREA | max score change | "
          "fast: top-1 as INTER_AREA | max score change |")
    print("|---|---|---|---|---|---|---|---|")
    inputs: dict[tuple[int, int], InputSpec] = {}
    for path, norm in MODELS:
        clf = Classifier(path, normalization=norm)
        inputs.setdefault((clf.input.height, clf.input.width), clf.input)
        for size in SIZES:
            n = len(shots[size])
            d = agreement(clf, shots[size], None)
            f = agreement(clf, shots[size], False)
            chosen = resize_path(size[1], size[0], clf.input.height, clf.input.width)
            print(f"| {path.stem} | {clf.input.width}x{clf.input.height} | {size[0]}x{size[1]} | {chosen} | "
                  f"{_cell(d, n)} | {d[3]:.3f} | {_cell(f, n)} | {f[3]:.3f} |", flush=True)
    print()
    print("| input | frame | INTER_AREA ms | fast ms | default ms (path) | INTER_AREA / fast |")
    print("|---|---|---|---|---|---|")
    for (h, w), spec in sorted(inputs.items()):
        for size in SIZES:
            c = costs(spec, shots[size][0], args.rounds)
            print(f"| {w}x{h} | {size[0]}x{size[1]} | {c['INTER_AREA']:.2f} | {c['fast']:.2f} | "
                  f"{c['default']:.2f} ({resize_path(size[1], size[0], h, w)}) | "
                  f"{c['INTER_AREA'] / c['fast']:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
