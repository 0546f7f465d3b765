"""Camera frame -> model input tensor. Pure functions, no interpreter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

# A box in frame pixels: x0, y0, x1, y1 (x1, y1 exclusive).
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class InputSpec:
    height: int
    width: int
    dtype: type
    scale: float = 0.0  # 0 for float inputs
    zero_point: int = 0
    # Normalisation of float inputs: (pixel - mean) / std. Quantized uint8 inputs
    # take raw pixels: their quantization already encodes the normalisation.
    mean: float = 127.5
    std: float = 127.5


def crop_box(height: int, width: int, target_h: int, target_w: int, crop: bool) -> Box:
    """The part of the frame the model sees: all of it, or the centred box of the input's aspect."""
    if not crop:
        return 0, 0, width, height
    want = target_w / target_h
    if width / height > want:
        w = max(1, round(height * want))
        x0 = (width - w) // 2
        return x0, 0, x0 + w, height
    h = max(1, round(width / want))
    y0 = (height - h) // 2
    return 0, y0, width, y0 + h


def resize_area_fast(image: np.ndarray, width: int, height: int, keep: dict | None = None) -> np.ndarray:
    """Area-like downscaling at a fraction of INTER_AREA's cost.

    INTER_AREA at a fractional factor is OpenCV's slow path: 1.3 ms for 640x480 -> 224x224
    and 3.3 ms for 1280x720 here, more than the model. Within 2x of the target, bilinear
    is already close to an area average and is used alone. Beyond, a bilinear step to
    an integer multiple of the target (2x at least, so each output pixel averages a
    block; at most 3x below the frame, so the bilinear step skips few pixels) is
    followed by INTER_AREA's integer path. On the shared images at their own size,
    640x480, 1280x720 and 1920x1080, the two MobileNetV2 models keep every top-1 label
    of plain INTER_AREA, with top-1 scores within 0.03-0.05; the tiny MobileNetV1
    0.25/128 sits on near ties it can tip (see README), hence `exact`. Nearest-neighbour
    for the first step would halve its cost but moves scores twice as much.

    With `keep`, keep["view"] is the largest picture made on the way (the intermediate,
    or the image itself): overlays are drawn from it while it is still in the cache.
    """
    h, w = image.shape[:2]
    if w <= 2 * width and h <= 2 * height:
        if keep is not None:
            keep["view"] = image
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    kx, ky = max(2, math.ceil(w / (3 * width))), max(2, math.ceil(h / (3 * height)))
    mid = cv2.resize(image, (kx * width, ky * height), interpolation=cv2.INTER_LINEAR)
    if keep is not None:
        keep["view"] = mid
    return cv2.resize(mid, (width, height), interpolation=cv2.INTER_AREA)


def to_input(
    frame_bgr: np.ndarray, spec: InputSpec, crop: bool = False, exact: bool = False, keep: dict | None = None
) -> tuple[np.ndarray, Box]:
    """The model's [1, H, W, 3] input for a BGR (OpenCV order) frame, and the box it covers.

    With `keep`, keep["view"] is a BGR picture of the box at least the input's size (see resize_area_fast).
    """
    if frame_bgr.ndim == 2:
        frame_bgr = cv2.cvtColor(frame_bgr, cv2.COLOR_GRAY2BGR)
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 colour frame, got shape {frame_bgr.shape}")
    if frame_bgr.shape[2] == 4:
        frame_bgr = frame_bgr[:, :, :3]
    box = crop_box(frame_bgr.shape[0], frame_bgr.shape[1], spec.height, spec.width, crop)
    x0, y0, x1, y1 = box
    region = frame_bgr[y0:y1, x0:x1]
    if region.dtype != np.uint8:
        region = np.clip(region, 0, 255).astype(np.uint8)
    if exact:
        small = cv2.resize(region, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        if keep is not None:
            keep["view"] = region
    else:
        small = resize_area_fast(region, spec.width, spec.height, keep)
    rgb = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
    if spec.dtype == np.uint8:
        x = rgb
    elif spec.dtype == np.int8:
        # int8 models take pixel - 128: flipping the top bit does that without a widening copy.
        x = (rgb ^ 0x80).view(np.int8)
    else:
        x = (rgb.astype(np.float32) - spec.mean) / spec.std
    return x[np.newaxis], box
