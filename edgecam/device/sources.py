"""Frame sources: picamera2, OpenCV VideoCapture, a folder of images. Thin adapters.

A source opens, reads one BGR frame at a time, and closes. `live` sources (cameras,
streams, anything played at a set rate) run in the capture thread, where only the
newest frame is kept; the others hand every frame to the loop in turn.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from edgecam.core.errors import EdgecamError
from edgecam.core.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageRefused,
    image_files,
    quiet_opencv,
    read_image,
)

_log = logging.getLogger(__name__)


class SourceError(Exception):
    """The source cannot give frames now (not opened, gone, timed out, busy)."""


class SourceEnded(Exception):
    """A finite source (a folder or file played once) has no more frames."""


@dataclass
class Frame:
    image: np.ndarray  # BGR, what the model sees
    ts: float  # wall-clock capture time (time.time())
    mono: float  # monotonic capture time, for ages
    display: np.ndarray | None = None  # BGR, a larger picture for overlays when the source has one
    name: str = ""  # file name for folder sources


class Source(Protocol):
    live: bool
    description: str

    def open(self) -> None: ...
    def read(self) -> Frame: ...
    def close(self) -> None: ...


def check_frame(image: Any, where: str) -> np.ndarray:
    """A usable BGR frame, or SourceError saying what arrived instead."""
    if image is None:
        raise SourceError(f"{where}: no frame")
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise SourceError(f"{where}: empty frame")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise SourceError(f"{where}: frame of shape {image.shape} {image.dtype} is not an 8-bit colour image")
    return image[:, :, :3] if image.shape[2] == 4 else image


class _Pacer:
    """Sleeps so that frames leave at `fps` (0: no pacing)."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.next = 0.0

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self.next > now:
            time.sleep(self.next - now)
            now = self.next
        self.next = max(self.next + self.period, now)


class FolderSource:
    """Images from a directory in name order, once or repeated, optionally at a set rate."""

    def __init__(
        self, path: str | Path, repeat: bool = True, fps: float = 0.0, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.path = Path(path)
        self.max_pixels = max_pixels
        self.repeat = repeat
        self.live = fps > 0
        self.pacer = _Pacer(fps)
        self.files: list[Path] = []
        self.pos = 0
        # Files that did not decode, with the (mtime, size) they had then: not decoded again each
        # round of a repeated folder (a CPU cost and, from OpenCV's decoders, a log line each time)
        # until they change.
        self.skipped: dict[str, tuple[int, int]] = {}
        self.delivered = 0
        self.description = f"folder {self.path}"

    def open(self) -> None:
        if not self.path.is_dir():
            raise EdgecamError(f"source.uri: {self.path}: not a directory")
        self.files = image_files(self.path)
        if not self.files:
            raise EdgecamError(f"source.uri: {self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.pos = 0

    def read(self) -> Frame:
        # A file that does not decode is skipped, not fatal: one bad image must not stop a demo.
        for _ in range(len(self.files)):
            if self.pos >= len(self.files):
                if not self.repeat:
                    raise SourceEnded(self.description)
                self.pos = 0
            path = self.files[self.pos]
            self.pos += 1
            stamp = _stamp(path)
            if stamp is not None and self.skipped.get(path.name) == stamp:
                continue
            try:
                image = read_image(path, self.max_pixels)
            except ImageRefused as exc:
                if path.name not in self.skipped:  # once per file, not once per round of the folder
                    _log.warning("source: %s; skipped", exc)
                image = None
            if image is not None:
                self.skipped.pop(path.name, None)
                self.pacer.wait()
                self.delivered += 1
                return Frame(image, time.time(), time.monotonic(), name=path.name)
            self.skipped[path.name] = stamp or (0, 0)
        if self.pos >= len(self.files) and not self.repeat:
            if not self.delivered:
                names = ", ".join(sorted(self.skipped)[:5]) + (", ..." if len(self.skipped) > 5 else "")
                raise SourceEnded(f"{self.description}: no image could be decoded ({names})")
            raise SourceEnded(self.description)
        raise SourceError(f"{self.description}: none of the {len(self.files)} image files can be read")

    def close(self) -> None:
        pass


def parse_opencv_uri(uri: str) -> tuple[int | str, str]:
    """What to hand VideoCapture, and the kind: 'device', 'stream' or 'file'."""
    s = uri.strip()
    if s.isdigit():
        return int(s), "device"
    if s.startswith("/dev/video") and s[len("/dev/video"):].isdigit():
        # OpenCV's V4L2 backend opens by index, not by path.
        return int(s[len("/dev/video"):]), "device"
    if "://" in s:
        return s, "stream"
    return s, "file"


class OpenCVSource:
    """cv2.VideoCapture on a V4L2 device, an RTSP/HTTP stream or a video file."""

    def __init__(
        self,
        uri: str,
        width: int = 640,
        height: int = 480,
        repeat: bool = True,
        fps: float = 0.0,
        factory: Callable[..., Any] | None = None,
    ) -> None:
        self.target, self.kind = parse_opencv_uri(uri)
        self.uri = uri
        self.size = (width, height)
        self.repeat = repeat
        # Cameras and streams run at their own pace; a file is paced only when asked.
        self.live = self.kind != "file" or fps > 0
        self.pacer = _Pacer(fps if self.kind == "file" else 0.0)
        self.factory = factory or cv2.VideoCapture
        self.cap: Any = None
        self.description = f"opencv {self.kind} {uri}"
        quiet_opencv()

    def open(self) -> None:
        if self.kind == "file" and not Path(self.target).is_file():  # type: ignore[arg-type]
            raise EdgecamError(f"source.uri: {self.uri}: no such file or directory (nor a device or URL)")
        args = (self.target, cv2.CAP_V4L2) if self.kind == "device" else (self.target,)
        cap = self.factory(*args)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.description}: cannot open{_busy_hint(self.target)}")
        if self.kind == "device":
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.size[0])
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.size[1])
            # One buffered frame: the newest, not a queue of stale ones.
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self.cap = cap

    def read(self) -> Frame:
        if self.cap is None:
            raise SourceError(f"{self.description}: not open")
        ok, image = self.cap.read()
        if not ok and self.kind == "file":
            if not self.repeat:
                raise SourceEnded(self.description)
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self.cap.read()
        if not ok:
            raise SourceError(f"{self.description}: read failed (stream ended or device gone)")
        frame = check_frame(image, self.description)
        self.pacer.wait()
        return Frame(frame, time.time(), time.monotonic())

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def _busy_hint(target: int | str) -> str:
    dev = f"/dev/video{target}" if isinstance(target, int) else target
    if isinstance(dev, str) and dev.startswith("/dev/"):
        if not os.path.exists(dev):
            return f" ({dev} does not exist)"
        if not os.access(dev, os.R_OK | os.W_OK):
            return f" (no permission on {dev}: add the user to the 'video' group)"
        return f" ({dev} exists: another process may hold it, or it is not a capture device)"
    return ""


# picamera2 formats are named by the 32-bit word, so in memory they run backwards:
# 'RGB888' arrays are B,G,R (OpenCV's order) and 'BGR888' arrays are R,G,B.
PICAMERA2_FORMATS = ("RGB888", "BGR888", "XRGB8888", "XBGR8888", "YUV420", "NV12", "NV21")


def picamera2_to_bgr(array: np.ndarray, fmt: str, size: tuple[int, int]) -> np.ndarray:
    """A picamera2 array of `fmt` at `size` (w, h) as a BGR image."""
    w, h = size
    if fmt == "RGB888":
        return array[:h, :w]
    if fmt == "BGR888":
        return cv2.cvtColor(np.ascontiguousarray(array[:h, :w]), cv2.COLOR_RGB2BGR)
    if fmt in ("XRGB8888", "XBGR8888"):
        bgr = array[:h, :w, :3]
        return bgr if fmt == "XRGB8888" else cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_RGB2BGR)
    if fmt == "YUV420":
        return yuv420_to_bgr(array, w, h)
    if fmt in ("NV12", "NV21"):
        return nv12_to_bgr(array, w, h, fmt)
    raise SourceError(f"picamera2: unsupported stream format {fmt}")


def nv12_to_bgr(array: np.ndarray, width: int, height: int, fmt: str = "NV12") -> np.ndarray:
    """picamera2's NV12 (or NV21) array, shape (h * 3 / 2, >= w): a Y plane, then h/2 rows of
    interleaved U,V (V,U) pairs as wide as the Y rows, to BGR."""
    rows, cols = array.shape[:2]
    if array.ndim != 2 or rows != height * 3 // 2 or cols < width or height % 2 or width % 2:
        raise SourceError(f"picamera2: {fmt} array of shape {array.shape} does not fit {width}x{height}")
    code = cv2.COLOR_YUV2BGR_NV12 if fmt == "NV12" else cv2.COLOR_YUV2BGR_NV21
    return cv2.cvtColor(np.ascontiguousarray(array[:, :width]), code)


def yuv420_to_bgr(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """picamera2's YUV420 (I420) array, shape (h * 3 / 2, stride), to BGR.

    Rows are `stride` bytes wide, which may exceed the width. The U and V planes are
    h/2 rows of stride/2 bytes each, packed two to an array row, so they are
    unpacked before the padding is cut off.
    """
    rows, stride = array.shape[:2]
    if rows != height * 3 // 2 or stride < width or height % 2 or width % 2:
        raise SourceError(f"picamera2: YUV420 array of shape {array.shape} does not fit {width}x{height}")
    y = array[:height, :width]
    flat = np.ascontiguousarray(array[height:]).reshape(-1)
    half = (height // 2) * (stride // 2)
    u = flat[:half].reshape(height // 2, stride // 2)[:, : width // 2]
    v = flat[half : 2 * half].reshape(height // 2, stride // 2)[:, : width // 2]
    i420 = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(height * 3 // 2, width)
    return cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)


def is_pi5(model_file: str = "/proc/device-tree/model") -> bool:
    """Pi 5 (and 500) ISPs give RGB on the low-resolution stream; older ones only YUV420."""
    try:
        text = Path(model_file).read_bytes().decode("ascii", "replace")
    except OSError:
        return False
    return "Raspberry Pi 5" in text or "Raspberry Pi 500" in text or "Compute Module 5" in text


class Picamera2Source:
    """A Raspberry Pi camera through picamera2, with the ISP scaling to the model's input.

    The low-resolution stream is asked at the model's input size, so the ISP, not
    the CPU, does the downscaling; the main stream at (width, height) is the picture
    overlays are drawn on. With overlays off, only the main stream runs, at the
    model's size.
    """

    def __init__(
        self,
        model_size: tuple[int, int],
        display_size: tuple[int, int] | None,
        factory: Callable[[], Any] | None = None,
        pi5: bool | None = None,
        wait: float = 5.0,
    ) -> None:
        self.model_size = model_size
        # How long a capture may take. picamera2 otherwise waits forever, and a capture thread left
        # stuck holds the camera, so the fresh source opened in its place could never acquire it.
        self.wait = wait
        self.display_size = display_size
        self.factory = factory
        self.pi5 = is_pi5() if pi5 is None else pi5
        self.cam: Any = None
        self.live = True
        self.lores_format = "RGB888" if self.pi5 else "YUV420"
        self.description = "picamera2"
        # Each stream's format and (w, h) as libcamera configured them (see negotiated()).
        self.streams: dict[str, tuple[str, tuple[int, int]]] = {}

    def configuration(self, cam: Any) -> Any:
        if self.display_size is None:
            return cam.create_video_configuration(
                main={"size": self.model_size, "format": "RGB888"}, buffer_count=4, queue=False
            )
        return cam.create_video_configuration(
            main={"size": self.display_size, "format": "RGB888"},
            lores={"size": self.model_size, "format": self.lores_format},
            buffer_count=4,
            queue=False,
        )

    def open(self) -> None:
        factory = self.factory or _import_picamera2()
        try:
            cam = factory()
        except (RuntimeError, OSError, IndexError) as exc:
            text = " ".join(str(exc).split())
            if "busy" in text.lower() or "acquire" in text.lower():
                raise SourceError(
                    "picamera2: the camera is busy: another process holds it (only one can; "
                    "stop the other edgecam or rpicam/libcamera app)"
                ) from None
            if isinstance(exc, IndexError) or "no camera" in text.lower():
                raise SourceError("picamera2: no camera found (check the cable; `rpicam-hello --list`)") from None
            raise SourceError(f"picamera2: cannot open the camera: {text}") from None
        try:
            asked = self.configuration(cam)
            cam.configure(asked)
            streams = {name: negotiated(cam, name, asked[name]) for name in self.stream_names()}
            cam.start()
        except SourceError:
            cam.close()
            raise
        except Exception as exc:  # picamera2 raises bare RuntimeErrors and libcamera errors alike
            cam.close()
            raise SourceError(f"picamera2: cannot start the camera: {' '.join(str(exc).split())}") from None
        self.cam = cam
        self.streams = streams
        model, display = streams[self.stream_names()[-1]], streams["main"] if self.display_size else None
        self.description = f"picamera2 {model[1][0]}x{model[1][1]}" + (
            f" + {display[1][0]}x{display[1][1]}" if display else ""
        )

    def stream_names(self) -> list[str]:
        """The streams read, the one the model sees last."""
        return ["main"] if self.display_size is None else ["main", "lores"]

    def read(self) -> Frame:
        if self.cam is None:
            raise SourceError("picamera2: not open")
        try:
            if self.display_size is None:
                main = self.cam.capture_array("main", wait=self.wait)
                ts, mono = time.time(), time.monotonic()
                image = check_frame(picamera2_to_bgr(main, *self.streams["main"]), "picamera2")
                return Frame(image, ts, mono)
            arrays, _ = self.cam.capture_arrays(["main", "lores"], wait=self.wait)
        except SourceError:
            raise
        except TimeoutError:
            raise SourceError(f"picamera2: no frame within {self.wait:g} s") from None
        except Exception as exc:
            raise SourceError(f"picamera2: capture failed: {' '.join(str(exc).split())}") from None
        ts, mono = time.time(), time.monotonic()
        main, lores = arrays
        display = check_frame(picamera2_to_bgr(main, *self.streams["main"]), "picamera2 main")
        image = check_frame(picamera2_to_bgr(lores, *self.streams["lores"]), "picamera2 lores")
        return Frame(image, ts, mono, display=display)

    def close(self) -> None:
        if self.cam is not None:
            try:
                self.cam.stop()
            finally:
                self.cam.close()
                self.cam = None


def negotiated(cam: Any, name: str, asked: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    """The format and size libcamera settled on for a stream, which may not be what was asked:
    libcamera adjusts a request to what the camera can give (a Pi's ISP gives what is asked; a
    USB or virtual camera may give only NV12 or YUYV, only at some sizes), and picamera2 then
    writes the adjusted stream into `camera_config`. Reading the arrays as asked would turn an
    NV12 frame into a grey picture without a word. A format edgecam cannot convert is refused."""
    fmt, size = str(asked["format"]), tuple(asked["size"])
    got = getattr(cam, "camera_config", None)
    stream = got.get(name) if isinstance(got, dict) else None
    if isinstance(stream, dict):
        fmt, size = str(stream.get("format", fmt)), tuple(stream.get("size", size))
    if fmt not in PICAMERA2_FORMATS:
        raise SourceError(
            f"picamera2: the camera gives {fmt} on its {name} stream, which edgecam does not convert "
            f"(it takes {', '.join(PICAMERA2_FORMATS)})"
        )
    w, h = int(size[0]), int(size[1])
    if (fmt, (w, h)) != (asked["format"], tuple(asked["size"])):
        _log.info("picamera2: the %s stream is %s %dx%d (asked %s %dx%d): libcamera adjusted it",
                  name, fmt, w, h, asked["format"], *asked["size"])
    return fmt, (w, h)


def _import_picamera2() -> Callable[[], Any]:
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise EdgecamError(f"picamera2: not importable ({exc}; on a Pi: sudo apt install python3-picamera2)") from None
    return Picamera2  # type: ignore[no-any-return]


def v4l2_devices(pattern: str = "/dev/video*") -> list[str]:
    """Capture-capable V4L2 nodes, in number order (a USB camera also exposes a metadata node)."""
    found = []
    for dev in sorted(glob.glob(pattern), key=lambda d: int("".join(c for c in d if c.isdigit()) or 0)):
        name = Path(dev).name
        caps = Path(f"/sys/class/video4linux/{name}/device_caps")
        # Skip Pi ISP and codec nodes: they are not cameras.
        label = Path(f"/sys/class/video4linux/{name}/name")
        try:
            text = label.read_text().strip().lower()
        except OSError:
            text = ""
        if any(k in text for k in ("bcm2835-codec", "bcm2835-isp", "pispbe", "rpi-hevc", "unicam", "rp1-cfe")):
            continue
        try:
            # V4L2_CAP_VIDEO_CAPTURE = 0x1; metadata-only nodes lack it.
            if not int(caps.read_text().strip(), 16) & 0x1:
                continue
        except (OSError, ValueError):
            pass
        found.append(dev)
    return found


def make_source(
    kind: str,
    uri: str,
    model_size: tuple[int, int],
    display_size: tuple[int, int] | None,
    capture_size: tuple[int, int],
    repeat: bool = True,
    fps: float = 0.0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    read_timeout: float = 5.0,
) -> Source:
    """The configured source, not yet opened ('auto' is open_auto's)."""
    if kind == "folder":
        return FolderSource(uri, repeat, fps, max_pixels)
    if kind == "opencv":
        return OpenCVSource(uri, capture_size[0], capture_size[1], repeat, fps)
    if kind == "picamera2":
        return Picamera2Source(model_size, display_size, wait=read_timeout)
    raise EdgecamError(f"source.kind: unknown source {kind!r}")


def open_auto(
    model_size: tuple[int, int], display_size: tuple[int, int] | None, capture_size: tuple[int, int],
    read_timeout: float = 5.0,
) -> Source:
    tried = []
    pic = Picamera2Source(model_size, display_size, wait=read_timeout)
    try:
        pic.open()
        return pic
    except (SourceError, EdgecamError) as exc:
        tried.append(str(exc))
    devices = v4l2_devices()
    for dev in devices:
        cam = OpenCVSource(dev, capture_size[0], capture_size[1])
        try:
            cam.open()
            return cam
        except SourceError as exc:
            tried.append(str(exc))
    if not devices:
        tried.append("V4L2: no /dev/video* capture device")
    raise EdgecamError(
        "source auto: no camera found; tried " + "; ".join(tried) + "; "
        'set source.kind = "folder" or "opencv" with source.uri, or --source'
    )


def _stamp(path: Path) -> tuple[int, int] | None:
    """A file's modification time and size, to tell that it changed; None if it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
