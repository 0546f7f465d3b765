"""Compares two sets of `edgecam explain --json` results (one JSON object a line) image by image.

    python3 lab/compare_explain.py REFERENCE OTHER [--tolerance SCORE]

REFERENCE and OTHER are files or directories of *.json files, e.g. x86_64 and aarch64 runs of the same
models on the same photographs. For each (model, image) found in both it prints the two top-1 labels and
scores, the score difference in steps of 1/256 (the uint8 softmax outputs' quantization step) and the
class activation map's largest difference relative to the map's range. Exits 1 when a top-1 differs
without being a near tie in the reference (its second score within the tolerance of the first), or when
a top-1 score differs by more than the tolerance, or when the two sets have no (model, image) in common.
Standard library only: it runs on the lab's host, outside any venv.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STEP = 1 / 256  # the scale of the shared models' uint8 softmax outputs


def load(path: Path) -> dict[tuple[str, str], dict]:
    """(model, image file name) -> the result, from a file or every *.json file in a directory."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    results = {}
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                results[(item["model"], Path(item["image"]).name)] = item
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"compare_explain: {file}:{number} is not an explain --json result ({exc})") from None
    return results


def map_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest absolute difference between two maps, relative to the first map's range (0 = identical)."""
    flat_a = [v for row in a for v in row]
    flat_b = [v for row in b for v in row]
    if len(flat_a) != len(flat_b):
        return float("inf")
    spread = (max(flat_a) - min(flat_a)) or 1.0
    return max(abs(x - y) for x, y in zip(flat_a, flat_b, strict=True)) / spread


def compare(reference: dict, other: dict, tolerance: float) -> tuple[list[str], int, float]:
    """One line per common (model, image), how many of them disagree, and the largest top-1 score
    difference among those with the same top-1."""
    lines, bad, largest = [], 0, 0.0
    for key in sorted(reference.keys() & other.keys()):
        ref, oth = reference[key], other[key]
        r1, o1 = ref["top"][0], oth["top"][0]
        diff = o1["score"] - r1["score"] if r1["id"] == o1["id"] else None
        tie = len(ref["top"]) > 1 and r1["score"] - ref["top"][1]["score"] <= tolerance
        if diff is None:
            verdict = "near tie" if tie else "DIFFERS"
            detail = f"{o1['label'].split(',')[0]} {o1['score']:.3f}"
        else:
            verdict = "same" if abs(diff) <= tolerance else "SCORE"
            largest = max(largest, abs(diff))
            detail = f"{diff:+.4f} ({diff / STEP:+.1f} steps)"
            if ref.get("cams") and oth.get("cams"):
                detail += f", CAM {map_difference(ref['cams'][0]['map'], oth['cams'][0]['map']):.2%} of range"
        bad += verdict in ("DIFFERS", "SCORE")
        lines.append(f"{verdict:8} {key[0]:30} {key[1]:18} {r1['label'].split(',')[0]} {r1['score']:.3f}: {detail}")
    return lines, bad, largest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--tolerance", type=float, default=2 * STEP,
                        help="largest top-1 score difference (default: 2/256)")
    args = parser.parse_args(argv)
    for path in (args.reference, args.other):
        if not path.exists():
            print(f"compare_explain: {path} does not exist", file=sys.stderr)
            return 2
    reference, other = load(args.reference), load(args.other)
    lines, bad, largest = compare(reference, other, args.tolerance)
    if not lines:
        print("compare_explain: no (model, image) in common", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"{len(lines)} compared, {bad} disagree; largest top-1 score difference {largest:.4f} "
          f"({largest / STEP:.1f} steps of 1/256)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
