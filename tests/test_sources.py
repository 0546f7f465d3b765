"""Frame sources: a folder of real photos, a real video file, OpenCV and picamera2 stand-ins, pixel formats."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import IMAGES

from edgecam.core.errors import EdgecamError
from edgecam.device.config import Config
from edgecam.device.run import open_capture
from edgecam.device.sources import (
    FolderSource,
    OpenCVSource,
    Picamera2Source,
    SourceEnded,
    SourceError,
    is_pi5,
    make_source,
    nv12_to_bgr,
    parse_opencv_uri,
    picamera2_to_bgr,
    v4l2_devices,
    yuv420_to_bgr,
)

GOOD = ["bird.bmp", "cat.bmp", "parrot.jpg"]
VIDEO_FRAMES = 10
VIDEO_SIZE = (160, 120)  # w, h


# --- FolderSource ---------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three real photos, a text file (ignored by suffix) and a .jpg of garbage (skipped when read)."""
    d = tmp_path / "pics"
    d.mkdir()
    for name in GOOD:
        shutil.copy(IMAGES / name, d / name)
    (d / "notes.txt").write_text("not an image\n", encoding="utf-8")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG " * 20)
    return d


def expected_image(name: str) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_folder_reads_images_in_name_order_once(folder: Path) -> None:
    src = FolderSource(folder, repeat=False)
    src.open()
    assert [f.name for f in src.files] == ["bird.bmp", "broken.jpg", "cat.bmp", "parrot.jpg"]
    frames = [src.read() for _ in GOOD]
    assert [f.name for f in frames] == GOOD
    for frame in frames:
        assert frame.image.dtype == np.uint8 and frame.image.ndim == 3 and frame.image.shape[2] == 3
        assert np.array_equal(frame.image, expected_image(frame.name))
        assert frame.display is None and frame.ts > 0 and frame.mono > 0
    assert set(src.skipped) == {"broken.jpg"}
    with pytest.raises(SourceEnded):
        src.read()
    with pytest.raises(SourceEnded):
        src.read()
    src.close()


def test_folder_repeats(folder: Path) -> None:
    src = FolderSource(folder, repeat=True)
    src.open()
    names = [src.read().name for _ in range(8)]
    assert names == [*GOOD, *GOOD, *GOOD[:2]]


def test_folder_corrupt_last_file_then_end(tmp_path: Path) -> None:
    shutil.copy(IMAGES / "cat.bmp", tmp_path / "a.bmp")
    (tmp_path / "z.png").write_bytes(b"garbage")
    src = FolderSource(tmp_path, repeat=False)
    src.open()
    assert src.read().name == "a.bmp"
    with pytest.raises(SourceEnded):
        src.read()


def test_folder_open_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgecamError, match="no image files"):
        FolderSource(empty).open()
    (empty / "readme.txt").write_text("x", encoding="utf-8")
    (empty / "sub.jpg").mkdir()  # a directory with an image suffix is not a file
    with pytest.raises(EdgecamError, match="no image files"):
        FolderSource(empty).open()
    with pytest.raises(EdgecamError, match="not a directory") as info:
        FolderSource(tmp_path / "missing").open()
    assert "missing" in str(info.value)


def test_folder_of_only_corrupt_images_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "b.bmp").write_bytes(b"BM garbage")
    src = FolderSource(tmp_path, repeat=True)
    src.open()
    with pytest.raises(SourceError, match="none of the 2 image files"):
        src.read()


def test_folder_is_live_only_when_paced(folder: Path) -> None:
    assert FolderSource(folder).live is False
    assert FolderSource(folder, fps=0.0).live is False
    assert FolderSource(folder, fps=5.0).live is True


# --- OpenCVSource on a real video file -----------------------------------------------------------


def frame_number(image: np.ndarray) -> int:
    """The frames are solid grey at 25 * n (with the number drawn in red), so the corner gives n back."""
    return round(float(image[:10, :10].mean()) / 25)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, VIDEO_SIZE)
    assert writer.isOpened()
    for n in range(VIDEO_FRAMES):
        img = np.full((VIDEO_SIZE[1], VIDEO_SIZE[0], 3), 25 * n, np.uint8)
        cv2.putText(img, str(n), (60, 80), cv2.FONT_HERSHEY_SIMPLEX, 2, (0, 0, 255), 3)
        writer.write(img)
    writer.release()
    return path


def test_video_file_plays_once(video: Path) -> None:
    src = OpenCVSource(str(video), repeat=False)
    assert src.kind == "file" and src.live is False
    src.open()
    try:
        numbers = []
        for _ in range(VIDEO_FRAMES):
            frame = src.read()
            assert frame.image.shape == (VIDEO_SIZE[1], VIDEO_SIZE[0], 3) and frame.image.dtype == np.uint8
            numbers.append(frame_number(frame.image))
        assert numbers == list(range(VIDEO_FRAMES))
        with pytest.raises(SourceEnded):
            src.read()
    finally:
        src.close()
    assert src.cap is None
    with pytest.raises(SourceError, match="not open"):
        src.read()


def test_video_file_repeats(video: Path) -> None:
    src = OpenCVSource(str(video), repeat=True)
    src.open()
    try:
        numbers = [frame_number(src.read().image) for _ in range(VIDEO_FRAMES + 3)]
    finally:
        src.close()
    assert numbers == [*range(VIDEO_FRAMES), 0, 1, 2]


def test_video_file_live_only_when_paced(video: Path) -> None:
    assert OpenCVSource(str(video)).live is False
    assert OpenCVSource(str(video), fps=200.0).live is True
    # Cameras and streams are live whatever the fps.
    assert OpenCVSource("0").live is True
    assert OpenCVSource("rtsp://cam.lan/stream").live is True


def test_missing_video_file(tmp_path: Path) -> None:
    with pytest.raises(EdgecamError, match="no such file") as info:
        OpenCVSource(str(tmp_path / "nope.mp4")).open()
    assert "nope.mp4" in str(info.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("0", (0, "device")),
        (" 3 ", (3, "device")),
        ("/dev/video2", (2, "device")),
        ("/dev/video", ("/dev/video", "file")),
        ("/dev/videoX", ("/dev/videoX", "file")),
        ("rtsp://x/y", ("rtsp://x/y", "stream")),
        ("http://cam.lan:8080/video", ("http://cam.lan:8080/video", "stream")),
        ("clip.mp4", ("clip.mp4", "file")),
        ("/data/clip 2.avi", ("/data/clip 2.avi", "file")),
    ],
)
def test_parse_opencv_uri(uri: str, expected: tuple[int | str, str]) -> None:
    assert parse_opencv_uri(uri) == expected


# --- OpenCVSource against a stand-in VideoCapture -------------------------------------------------


class FakeCapture:
    """cv2.VideoCapture's methods, replaying `results` from read()."""

    def __init__(
        self, args: tuple[Any, ...], opened: bool = True, results: list[tuple[bool, Any]] | None = None
    ) -> None:
        self.args = args
        self.opened = opened
        self.results = list(results or [])
        self.props: dict[int, float] = {}
        self.released = 0

    def isOpened(self) -> bool:  # cv2's name
        return self.opened

    def read(self) -> tuple[bool, Any]:
        return self.results.pop(0)

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def release(self) -> None:
        self.released += 1


class FakeFactory:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.made: list[FakeCapture] = []

    def __call__(self, *args: Any) -> FakeCapture:
        cap = FakeCapture(args, **self.kwargs)
        self.made.append(cap)
        return cap


def test_device_that_does_not_open() -> None:
    factory = FakeFactory(opened=False)
    src = OpenCVSource("/dev/video7", factory=factory)
    with pytest.raises(SourceError) as info:
        src.open()
    msg = str(info.value)
    assert "/dev/video7" in msg and "cannot open" in msg
    assert factory.made[0].args == (7, cv2.CAP_V4L2)
    assert factory.made[0].released == 1
    assert src.cap is None


def test_stream_that_does_not_open_names_the_url() -> None:
    factory = FakeFactory(opened=False)
    with pytest.raises(SourceError, match=re.escape("opencv stream rtsp://cam.lan/live: cannot open")):
        OpenCVSource("rtsp://cam.lan/live", factory=factory).open()
    assert factory.made[0].args == ("rtsp://cam.lan/live",)


def test_device_open_asks_size_and_one_buffer() -> None:
    image = np.full((48, 64, 3), 7, np.uint8)
    factory = FakeFactory(results=[(True, image)])
    src = OpenCVSource("1", width=320, height=240, factory=factory)
    src.open()
    cap = factory.made[0]
    assert cap.props == {cv2.CAP_PROP_FRAME_WIDTH: 320, cv2.CAP_PROP_FRAME_HEIGHT: 240, cv2.CAP_PROP_BUFFERSIZE: 1}
    assert np.array_equal(src.read().image, image)
    src.close()
    assert cap.released == 1 and src.cap is None


@pytest.mark.parametrize("uri", ["0", "rtsp://cam.lan/live"])
def test_failed_read_is_a_source_error(uri: str) -> None:
    src = OpenCVSource(uri, factory=FakeFactory(results=[(False, None)]))
    src.open()
    with pytest.raises(SourceError, match="read failed"):
        src.read()


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        (None, "no frame"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((10, 10, 2), np.uint8), "(10, 10, 2)"),
        (np.zeros((10, 10, 3), np.float32), "float32"),
        (np.zeros((2, 10, 10, 3), np.uint8), "not an 8-bit colour image"),
        ("not an array", "empty"),
    ],
)
def test_bad_frames_are_source_errors(image: Any, needle: str) -> None:
    src = OpenCVSource("rtsp://cam.lan/live", factory=FakeFactory(results=[(True, image)]))
    src.open()
    with pytest.raises(SourceError) as info:
        src.read()
    assert needle in str(info.value)
    assert "rtsp://cam.lan/live" in str(info.value)


def test_gray_and_four_channel_frames_become_bgr() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    bgra = np.dstack([np.full((3, 4), c, np.uint8) for c in (10, 20, 30, 255)])
    src = OpenCVSource("0", factory=FakeFactory(results=[(True, gray), (True, bgra)]))
    src.open()
    out = src.read().image
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[:, :, c], gray) for c in range(3))
    out = src.read().image
    assert out.shape == (3, 4, 3) and out[0, 0].tolist() == [10, 20, 30]


# --- picamera2 pixel formats -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bgr() -> np.ndarray:
    """A real 64x48 BGR picture: a crop of the parrot."""
    image = expected_image("parrot.jpg")
    h, w = image.shape[:2]
    crop = image[h // 4 : h // 4 + 240, w // 4 : w // 4 + 320]
    return cv2.resize(crop, (64, 48), interpolation=cv2.INTER_AREA)


def test_rgb888_passes_through(bgr: np.ndarray) -> None:
    # picamera2 'RGB888' is B,G,R in memory: OpenCV's order already.
    assert np.array_equal(picamera2_to_bgr(bgr.copy(), "RGB888", (64, 48)), bgr)
    # Rows wider than the image (stride padding) are cut off.
    padded = np.zeros((48, 80, 3), np.uint8)
    padded[:, :64] = bgr
    assert np.array_equal(picamera2_to_bgr(padded, "RGB888", (64, 48)), bgr)


def test_bgr888_is_swapped(bgr: np.ndarray) -> None:
    rgb_in_memory = np.ascontiguousarray(bgr[:, :, ::-1])
    out = picamera2_to_bgr(rgb_in_memory, "BGR888", (64, 48))
    assert out.shape == bgr.shape and np.array_equal(out, bgr)


def test_xrgb8888_drops_alpha(bgr: np.ndarray) -> None:
    xrgb = np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])
    out = picamera2_to_bgr(xrgb, "XRGB8888", (64, 48))
    assert out.shape == (48, 64, 3) and np.array_equal(out, bgr)
    xbgr = np.dstack([bgr[:, :, ::-1], np.full(bgr.shape[:2], 255, np.uint8)])
    assert np.array_equal(picamera2_to_bgr(xbgr, "XBGR8888", (64, 48)), bgr)


def test_unsupported_format(bgr: np.ndarray) -> None:
    with pytest.raises(SourceError, match="unsupported stream format MJPEG"):
        picamera2_to_bgr(bgr, "MJPEG", (64, 48))


def picamera2_yuv420(i420: np.ndarray, width: int, height: int, stride: int) -> np.ndarray:
    """OpenCV's packed I420 laid out as picamera2 gives it: rows of `stride` bytes.

    Y is `height` rows padded to `stride`; U and V are height/2 rows of stride/2 bytes
    (width/2 of picture, the rest padding), packed two to an array row. Padding is garbage.
    """
    flat = i420.reshape(-1)
    n = width * height
    y = flat[:n].reshape(height, width)
    u = flat[n : n + n // 4].reshape(height // 2, width // 2)
    v = flat[n + n // 4 :].reshape(height // 2, width // 2)
    rng = np.random.default_rng(7)
    out = rng.integers(0, 256, (height * 3 // 2, stride), dtype=np.uint8)
    out[:height, :width] = y
    chroma = out[height:].reshape(-1)
    half = (height // 2) * (stride // 2)
    for k, plane in enumerate((u, v)):
        rows = chroma[k * half : (k + 1) * half].reshape(height // 2, stride // 2)
        rows[:, : width // 2] = plane
    assert out.shape == (height * 3 // 2, stride)
    return out


@pytest.mark.parametrize("stride", [96, 64, 128])
def test_yuv420_with_stride(bgr: np.ndarray, stride: int) -> None:
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
    assert i420.shape == (72, 64)
    expected = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)
    padded = picamera2_yuv420(i420, 64, 48, stride)
    out = yuv420_to_bgr(padded, 64, 48)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, expected)
    assert np.array_equal(picamera2_to_bgr(padded, "YUV420", (64, 48)), expected)
    # And it is the picture (within YUV rounding), not just the same mistake twice.
    assert np.abs(out.astype(int) - bgr.astype(int)).mean() < 8


@pytest.mark.parametrize(
    ("shape", "size"),
    [((70, 96), (64, 48)), ((72, 60), (64, 48)), ((48, 64), (64, 48)), ((72, 96), (63, 48)), ((73, 96), (64, 49))],
)
def test_yuv420_wrong_shape(shape: tuple[int, int], size: tuple[int, int]) -> None:
    with pytest.raises(SourceError, match="does not fit"):
        yuv420_to_bgr(np.zeros(shape, np.uint8), *size)


# --- Picamera2Source against a stand-in ----------------------------------------------------------


class FakePicamera2:
    """picamera2.Picamera2's methods as edgecam uses them, recording every call."""

    def __init__(
        self,
        main: np.ndarray | None = None,
        lores: np.ndarray | None = None,
        fail: dict[str, Exception] | None = None,
        adjust: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.main, self.lores = main, lores
        self.fail = fail or {}
        # What libcamera changes in each stream at configure (picamera2 writes it to camera_config).
        self.adjust = adjust or {}
        self.calls: list[tuple[str, Any]] = []
        self.waits: list[float | None] = []  # each capture's timeout

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise self.fail[name]

    def create_video_configuration(self, **kwargs: Any) -> dict[str, Any]:
        self._call("create_video_configuration", kwargs)
        return dict(kwargs)

    def configure(self, cfg: Any) -> None:
        self._call("configure", cfg)
        self.camera_config = {
            k: {**v, **self.adjust.get(k, {})} if isinstance(v, dict) else v for k, v in cfg.items()
        }

    def start(self) -> None:
        self._call("start")

    def stop(self) -> None:
        self._call("stop")

    def close(self) -> None:
        self._call("close")

    def capture_array(self, name: str = "main", wait: float | None = None) -> np.ndarray:
        self.waits.append(wait)
        self._call("capture_array", name)
        assert self.main is not None
        return self.main

    def capture_arrays(self, names: list[str], wait: float | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
        self.waits.append(wait)
        self._call("capture_arrays", list(names))
        arrays = {"main": self.main, "lores": self.lores}
        return [arrays[n] for n in names], {"SensorTimestamp": 123}  # type: ignore[misc]

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def configured(self) -> dict[str, Any]:
        return next(arg for name, arg in self.calls if name == "configure")


@pytest.fixture(scope="module")
def display() -> np.ndarray:
    image = expected_image("cat.bmp")
    return cv2.resize(image, (160, 120), interpolation=cv2.INTER_AREA)


def test_picamera2_main_stream_only(bgr: np.ndarray) -> None:
    cam = FakePicamera2(main=bgr.copy())
    src = Picamera2Source((64, 48), None, factory=lambda: cam, pi5=False)
    assert src.live is True
    src.open()
    cfg = cam.configured()
    assert cfg["main"] == {"size": (64, 48), "format": "RGB888"}
    assert "lores" not in cfg or cfg["lores"] is None
    assert cam.names() == ["create_video_configuration", "configure", "start"]
    frame = src.read()
    assert np.array_equal(frame.image, bgr) and frame.display is None
    assert cam.calls[-1] == ("capture_array", "main")
    assert "64x48" in src.description
    src.close()
    assert cam.names()[-2:] == ["stop", "close"] and src.cam is None


def test_picamera2_lores_yuv420_on_pi4(bgr: np.ndarray, display: np.ndarray) -> None:
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
    cam = FakePicamera2(main=display.copy(), lores=picamera2_yuv420(i420, 64, 48, 96))
    src = Picamera2Source((64, 48), (160, 120), factory=lambda: cam, pi5=False)
    src.open()
    cfg = cam.configured()
    assert cfg["main"] == {"size": (160, 120), "format": "RGB888"}
    assert cfg["lores"] == {"size": (64, 48), "format": "YUV420"}
    frame = src.read()
    assert cam.calls[-1] == ("capture_arrays", ["main", "lores"])
    assert frame.image.shape == (48, 64, 3)
    assert np.array_equal(frame.image, cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420))
    assert frame.display is not None and np.array_equal(frame.display, display)
    assert "64x48" in src.description and "160x120" in src.description
    src.close()


def test_picamera2_lores_rgb_on_pi5(bgr: np.ndarray, display: np.ndarray) -> None:
    cam = FakePicamera2(main=display.copy(), lores=bgr.copy())
    src = Picamera2Source((64, 48), (160, 120), factory=lambda: cam, pi5=True)
    src.open()
    assert cam.configured()["lores"] == {"size": (64, 48), "format": "RGB888"}
    frame = src.read()
    assert np.array_equal(frame.image, bgr)
    assert frame.display is not None and np.array_equal(frame.display, display)


def nv12(bgr: np.ndarray, fmt: str = "NV12") -> np.ndarray:
    """A BGR image as picamera2 hands an NV12 (NV21) stream: Y rows, then interleaved chroma rows."""
    h, w = bgr.shape[:2]
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    u, v = i420[w * h : w * h * 5 // 4], i420[w * h * 5 // 4 :]
    pairs = np.stack([u, v] if fmt == "NV12" else [v, u], axis=1).reshape(h // 2, w)
    return np.concatenate([i420[: w * h].reshape(h, w), pairs])


@pytest.mark.parametrize("fmt", ["NV12", "NV21"])
def test_picamera2_reads_the_stream_libcamera_adjusted(bgr: np.ndarray, fmt: str) -> None:
    """A camera that gives only NV12 at its own size (libcamera's virtual camera, some USB ones):
    the frame is converted from what arrived, not read as the RGB888 that was asked for."""
    big = cv2.resize(bgr, (96, 72), interpolation=cv2.INTER_LINEAR)
    cam = FakePicamera2(main=nv12(big, fmt), adjust={"main": {"format": fmt, "size": (96, 72)}})
    src = Picamera2Source((64, 48), None, factory=lambda: cam, pi5=False)
    src.open()
    assert cam.configured()["main"] == {"size": (64, 48), "format": "RGB888"}
    frame = src.read()
    code = cv2.COLOR_YUV2BGR_NV12 if fmt == "NV12" else cv2.COLOR_YUV2BGR_NV21
    assert frame.image.shape == (72, 96, 3)
    assert np.array_equal(frame.image, cv2.cvtColor(nv12(big, fmt), code))
    # In colour: nearer the picture than the grey one the Y plane read as RGB888 would give.
    grey = cv2.cvtColor(nv12(big, fmt)[:72], cv2.COLOR_GRAY2BGR)
    assert np.abs(frame.image.astype(int) - big).mean() < np.abs(grey.astype(int) - big).mean() / 2
    assert "96x72" in src.description


def test_picamera2_adjusted_lores_is_read_as_adjusted(bgr: np.ndarray, display: np.ndarray) -> None:
    cam = FakePicamera2(main=display.copy(), lores=nv12(bgr), adjust={"lores": {"format": "NV12"}})
    src = Picamera2Source((64, 48), (160, 120), factory=lambda: cam, pi5=False)
    src.open()
    frame = src.read()
    assert np.array_equal(frame.image, cv2.cvtColor(nv12(bgr), cv2.COLOR_YUV2BGR_NV12))
    assert frame.display is not None and np.array_equal(frame.display, display)


def test_picamera2_refuses_a_format_it_cannot_convert() -> None:
    cam = FakePicamera2(adjust={"main": {"format": "MJPEG", "size": (640, 480)}})
    src = Picamera2Source((64, 48), None, factory=lambda: cam, pi5=False)
    with pytest.raises(SourceError) as info:
        src.open()
    assert "gives MJPEG on its main stream" in str(info.value) and "NV12" in str(info.value)
    assert cam.names()[-1] == "close" and "start" not in cam.names() and src.cam is None


@pytest.mark.parametrize("shape", [(70, 96), (71, 96), (72, 94), (72, 96, 2)])
def test_nv12_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(SourceError, match=r"NV12 array of shape .* does not fit 96x48"):
        nv12_to_bgr(np.zeros(shape, np.uint8), 96, 48)


@pytest.mark.parametrize(
    ("exc", "needles"),
    [
        (RuntimeError("Failed to acquire camera: Device or resource busy"), ["busy", "another process"]),
        (IndexError("list index out of range"), ["no camera"]),
        (RuntimeError("strange\nthing   happened"), ["cannot open the camera", "strange thing happened"]),
    ],
)
def test_picamera2_open_errors(exc: Exception, needles: list[str]) -> None:
    def factory() -> Any:
        raise exc

    src = Picamera2Source((64, 48), None, factory=factory, pi5=False)
    with pytest.raises(SourceError) as info:
        src.open()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    assert src.cam is None


@pytest.mark.parametrize("step", ["configure", "start"])
def test_picamera2_failed_start_closes_the_camera(step: str) -> None:
    cam = FakePicamera2(fail={step: RuntimeError("lores size too large")})
    src = Picamera2Source((64, 48), (160, 120), factory=lambda: cam, pi5=False)
    with pytest.raises(SourceError, match="cannot start the camera: lores size too large"):
        src.open()
    assert cam.names()[-1] == "close"
    assert src.cam is None
    with pytest.raises(SourceError, match="not open"):
        src.read()


def test_picamera2_capture_failure_is_a_source_error(bgr: np.ndarray) -> None:
    cam = FakePicamera2(main=bgr, lores=bgr, fail={"capture_arrays": RuntimeError("dequeue timed out")})
    src = Picamera2Source((64, 48), (160, 120), factory=lambda: cam, pi5=True)
    src.open()
    with pytest.raises(SourceError, match="capture failed: dequeue timed out"):
        src.read()


@pytest.mark.parametrize("display", [None, (160, 120)])
def test_picamera2_capture_that_times_out_is_a_source_error(display: tuple[int, int] | None) -> None:
    """picamera2 waits forever unless told; a capture stuck in it would hold the camera, and the
    fresh source opened in its place could never acquire it. Each capture waits read_timeout at most."""
    fail = {"capture_array": TimeoutError(), "capture_arrays": TimeoutError()}
    cam = FakePicamera2(fail=fail)
    src = make_source("picamera2", "", (64, 48), display, (640, 480), read_timeout=7.5)
    assert isinstance(src, Picamera2Source)
    src.factory, src.pi5 = (lambda: cam), False
    src.open()
    with pytest.raises(SourceError, match=r"^picamera2: no frame within 7.5 s$"):
        src.read()
    assert cam.waits == [7.5]


def test_auto_picamera2_waits_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # source.kind = "auto" found picamera2 and kept its fixed 5 s wait, whatever source.read_timeout said.
    fail = {"capture_array": TimeoutError(), "capture_arrays": TimeoutError()}
    cam = FakePicamera2(fail=fail)
    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=lambda: cam))
    cfg = _config("auto")
    cfg.source.read_timeout = 9.0
    capture = open_capture(cfg, (64, 48))
    assert isinstance(capture.source, Picamera2Source)
    with pytest.raises(SourceError, match=r"^picamera2: no frame within 9 s$"):
        capture.source.read()
    assert cam.waits == [9.0]


def test_picamera2_close_closes_even_when_stop_fails() -> None:
    cam = FakePicamera2(fail={"stop": RuntimeError("already stopped")})
    src = Picamera2Source((64, 48), None, factory=lambda: cam, pi5=False)
    src.open()
    with contextlib.suppress(RuntimeError):
        src.close()
    assert cam.names()[-2:] == ["stop", "close"] and src.cam is None
    src.close()  # closing twice is harmless
    assert cam.names().count("close") == 1


# --- board and device discovery ------------------------------------------------------------------


def test_is_pi5(tmp_path: Path) -> None:
    pi5, pi4 = tmp_path / "pi5", tmp_path / "pi4"
    pi5.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    pi4.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert is_pi5(str(pi5)) is True
    assert is_pi5(str(pi4)) is False
    assert is_pi5(str(tmp_path / "missing")) is False


def test_v4l2_devices_none(tmp_path: Path) -> None:
    assert v4l2_devices(str(tmp_path / "video*")) == []


@pytest.mark.skipif(os.path.isdir("/sys/class/video4linux"), reason="real V4L2 nodes would be consulted")
def test_v4l2_devices_number_order(tmp_path: Path) -> None:
    for n in (10, 2, 0):
        (tmp_path / f"video{n}").touch()
    assert v4l2_devices(str(tmp_path / "video*")) == [str(tmp_path / f"video{n}") for n in (0, 2, 10)]


def _config(kind: str, uri: str = "", repeat: bool = True) -> Config:
    cfg = Config()
    cfg.source.kind, cfg.source.uri, cfg.source.repeat = kind, uri, repeat
    return cfg


@pytest.mark.skipif(
    os.path.exists("/dev/video0") or importlib.util.find_spec("picamera2") is not None,
    reason="this machine has a camera",
)
def test_auto_without_any_camera() -> None:
    with pytest.raises(EdgecamError) as info:
        open_capture(_config("auto"), (224, 224))
    msg = str(info.value)
    assert "picamera2" in msg and "V4L2" in msg
    assert "source.kind" in msg


def test_open_capture_kinds(folder: Path) -> None:
    capture = open_capture(_config("folder", str(folder), repeat=False), (224, 224))
    assert isinstance(capture.source, FolderSource) and capture.source.read().name == "bird.bmp"
    assert not capture.needs_open and capture.stats.state == "starting"
    with pytest.raises(EdgecamError, match="unknown source 'webcam'"):
        open_capture(_config("webcam"), (224, 224))
    # A folder is not going to appear by itself: fatal, unlike a camera.
    with pytest.raises(EdgecamError, match=r"^source.uri: .*nope: not a directory"):
        open_capture(_config("folder", str(folder / "nope")), (224, 224))


@pytest.mark.skipif(os.path.exists("/dev/video5"), reason="this machine has /dev/video5")
def test_missing_camera_is_not_fatal_but_degraded() -> None:
    capture = open_capture(_config("opencv", "/dev/video5"), (224, 224))
    assert capture.needs_open
    assert capture.stats.state == "degraded"
    assert "/dev/video5 does not exist" in capture.stats.reason
