"""Pictures of a CAM: upsampled heatmaps and overlays on the frame. Pure functions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgecam.core.cam import normalize
from edgecam.core.preprocess import Box

STYLES = ("blend", "dim")


def resize_picture(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Downscaling for pictures people look at, cheap at any factor.

    Within 2x bilinear does not alias; beyond, a bilinear step to twice the target is
    followed by INTER_AREA's integer 2x path. (INTER_AREA at a fractional factor costs
    more than a millisecond for a 320x240 picture.)
    """
    h, w = image.shape[:2]
    if w <= 2 * width and h <= 2 * height:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    mid = cv2.resize(image, (2 * width, 2 * height), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(mid, (width, height), interpolation=cv2.INTER_AREA)


def heat_u8(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map min-max scaled to 0..255 on its own grid, then upsampled bilinearly.

    Working in uint8 makes the upsampling about twenty times cheaper than in float
    (OpenCV's fixed-point path), and 256 levels are all a picture shows. Bilinear, as the
    frames are scaled: the daemon's first bicubic resize would bring 2.3 MB more of OpenCV's
    code into memory for one picture in ten (docs/performance.md, memory).
    """
    small = cv2.convertScaleAbs(normalize(cam), alpha=255.0)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


def heatmap(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """The upsampled map as 0..1 floats."""
    return heat_u8(cam, width, height).astype(np.float32) * (1.0 / 255.0)


# JET as a lookup table: applyColorMap builds one on every call, which costs more than the lookup.
_JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8).reshape(256, 1), cv2.COLORMAP_JET)


def jet_u8(heat: np.ndarray) -> np.ndarray:
    """BGR JET colouring of a 0..255 map."""
    return cv2.LUT(cv2.cvtColor(heat, cv2.COLOR_GRAY2BGR), _JET)


def overlay(
    frame_bgr: np.ndarray,
    cam: np.ndarray,
    style: str = "blend",
    box: Box | None = None,
    alpha: float = 0.45,
    threshold: float = 0.2,
) -> np.ndarray:
    """The frame with the CAM drawn over the part the model saw.

    blend: JET heatmap alpha-blended on the colour frame.
    dim: the frame in dimmed grayscale with the JET map on top, leaving out values under
    `threshold`, so only the evidence stands out.
    """
    if style not in STYLES:
        raise ValueError(f"overlay style {style!r} is not one of {STYLES}")
    out = frame_bgr.copy()
    x0, y0, x1, y1 = box if box is not None else (0, 0, frame_bgr.shape[1], frame_bgr.shape[0])
    region = out[y0:y1, x0:x1]
    heat8 = heat_u8(cam, x1 - x0, y1 - y0)
    colour = jet_u8(heat8)
    if style == "blend":
        region[:] = cv2.addWeighted(colour, alpha, region, 1.0 - alpha, 0.0)
    else:
        grey = cv2.cvtColor(cv2.cvtColor(region, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        dimmed = (grey.astype(np.float32) * 0.5).astype(np.uint8)
        heat = heat8.astype(np.float32) * (1.0 / 255.0)
        keep = heat >= threshold
        a = (0.35 + 0.5 * heat)[..., None]
        mixed = (colour.astype(np.float32) * a + dimmed.astype(np.float32) * (1 - a)).astype(np.uint8)
        region[:] = np.where(keep[..., None], mixed, dimmed)
    return out


def write_image(path: Path, image: np.ndarray, jpeg_quality: int = 90) -> None:
    """PNG or JPEG by the file's suffix; written atomically so a reader never sees half a file."""
    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(ext, image, params)
    if not ok:
        raise OSError(f"cannot encode {path.name} as {ext}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.tobytes())
    tmp.replace(path)
