"""Camera frame -> model input tensor. Pure functions, no interpreter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from edgecam.core.normalization import DEFAULT_NORMALIZATION, Normalization

# A box in frame pixels: x0, y0, x1, y1 (x1, y1 exclusive).
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class InputSpec:
    """What the model's input takes: size, channels (3 RGB or 1 grey), type and normalisation.

    Inputs are made channels-last ([1, H, W, C]); a channels-first model gets them transposed
    where they are handed to the interpreter (Classifier.set_input).
    """

    height: int
    width: int
    dtype: type
    scale: float = 0.0  # 0 for float inputs
    zero_point: int = 0
    norm: Normalization | None = None  # None: raw pixels for integer inputs, DEFAULT_NORMALIZATION for float
    channels: int = 3
    layout: str = "NHWC"

    @property
    def normalization(self) -> Normalization:
        """The normalisation in force, in pixel units, whoever stated it."""
        if self.norm is not None:
            return self.norm
        if not np.issubdtype(self.dtype, np.integer):
            return DEFAULT_NORMALIZATION
        return implied_by_quantization(self.dtype, self.scale, self.zero_point)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The interpreter's input shape."""
        if self.layout == "NCHW":
            return 1, self.channels, self.height, self.width
        return 1, self.height, self.width, self.channels

    @cached_property
    def lut(self) -> np.ndarray:
        """[256, C] model input value for each pixel value and channel: normalised, then quantized."""
        return encode_table(self.dtype, self.scale, self.zero_point, self.normalization, self.channels)

    @cached_property
    def _encoding(self) -> str:
        ramp = np.arange(256)
        if self.dtype == np.uint8 and (self.lut == ramp[:, None]).all():
            return "raw"
        if self.dtype == np.int8 and (self.lut.astype(np.int16) == ramp[:, None] - 128).all():
            return "xor"
        return "lut"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels [..., C] in the model's input encoding."""
        if self._encoding == "raw":
            return pixels
        if self._encoding == "xor":
            # pixel - 128: flipping the top bit does that without a widening copy.
            return (pixels ^ 0x80).view(np.int8)
        c = self.channels
        lut = self.lut.reshape(256, 1, c) if c > 1 else self.lut.reshape(256)
        out = cv2.LUT(pixels.reshape(pixels.shape[:2] + ((c,) if c > 1 else ())), lut)
        return out.reshape(pixels.shape)


def implied_by_quantization(dtype: type, scale: float, zero_point: int) -> Normalization:
    """What feeding the raw pixel byte means for a quantized input: its own scale, as a normalisation.

    uint8 takes the pixel itself, int8 the pixel - 128 (the TFLite convention for quantized image
    models, whose quantization is the normalisation they were trained with).
    """
    offset = 128 if dtype == np.int8 else 0
    if scale <= 0:
        return Normalization((float(offset),), (1.0,), "quantization")
    return Normalization((float(zero_point + offset),), (1.0 / scale,), "quantization")


def encode_table(dtype: type, scale: float, zero_point: int, norm: Normalization, channels: int) -> np.ndarray:
    """[256, channels] input values: (p - mean) / std, then quantized with the input's scale and zero point."""
    mean, std = norm.per_channel(channels)
    real = (np.arange(256, dtype=np.float64)[:, None] - mean[None, :]) / std[None, :]
    if not np.issubdtype(dtype, np.integer):
        return real.astype(dtype)
    info = np.iinfo(dtype)
    if scale <= 0:
        # No quantization stated: integers as they come (the raw pixel, or pixel - 128 for int8).
        q = np.arange(256)[:, None] - (128 if dtype == np.int8 else 0) + np.zeros(channels, np.int64)
    else:
        q = np.round(real / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


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
    followed by INTER_AREA's integer path. It moves the answers of small inputs and of
    small scale factors, so to_input takes it only where resize_path says (the table in
    docs/models.md). Nearest-neighbour for the first step would halve its cost but moves
    scores twice as much.

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


# Below these, the fast path moves answers (bench/bench_resize.py, docs/models.md): small inputs
# (a 32x32 CIFAR ResNet, a 128 px MobileNetV1 on near ties) and small scale factors (640x480 to
# 224, where one bilinear step does most of the work) take plain INTER_AREA.
FAST_MIN_INPUT = 160
FAST_MIN_FACTOR = 3.0


def resize_path(frame_h: int, frame_w: int, height: int, width: int) -> str:
    """"fast" or "exact": which downscaling keeps the model's answers for this frame and input size."""
    if min(height, width) < FAST_MIN_INPUT:
        return "exact"
    if frame_w < FAST_MIN_FACTOR * width or frame_h < FAST_MIN_FACTOR * height:
        return "exact"
    return "fast"


def to_input(
    frame_bgr: np.ndarray,
    spec: InputSpec,
    crop: bool = False,
    exact: bool | None = None,
    keep: dict | None = None,
) -> tuple[np.ndarray, Box]:
    """The model's [1, H, W, C] input for a BGR (OpenCV order) frame, and the box it covers.

    C is 3 (RGB) or 1 (grey, from the resized frame). `exact`: True for plain INTER_AREA, False
    for the fast path, None to choose by resize_path. With `keep`, keep["view"] is a BGR picture
    of the box at least the input's size (see resize_area_fast) and keep["resize"] the path taken.
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
    if exact is None:
        exact = resize_path(region.shape[0], region.shape[1], spec.height, spec.width) == "exact"
    if keep is not None:
        keep["resize"] = "exact" if exact else "fast"
    if exact:
        small = cv2.resize(region, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
        if keep is not None:
            keep["view"] = region
    else:
        small = resize_area_fast(region, spec.width, spec.height, keep)
    if spec.channels == 1:
        pixels = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)[:, :, np.newaxis]
    else:
        pixels = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
    return spec.encode(pixels)[np.newaxis], box
