"""Runs in the lab's guest: what picamera2 0.3.38 from PyPI needs to run on libcamera 0.4.0's virtual
camera, and a capture through edgecam's own picamera2 adapter. See docs/lab.md (picamera2).

    python3 picamera2_virtual.py prepare SITE_PACKAGES   # after pip installed picamera2 there
    /opt/edgecam/venv/bin/python picamera2_virtual.py probe OUT.png

`prepare` changes three things, each standing in for what a Raspberry Pi has and this guest does not;
none touches the stream configuration, the pixel formats or the frames themselves:

- `pykms`: picamera2 imports kms++'s binding (python3-kms++ on Raspberry Pi OS) for its DRM preview;
  neither Debian trixie nor PyPI has it. A stand-in module lets the import succeed; a preview fails.
- The raw modes: picamera2 asks every camera for a Raw stream when it opens it (a Pi's sensors and USB
  cameras through uvcvideo answer); the virtual camera refuses the Raw role, and picamera2 then fails
  with "Camera __init__ sequence did not complete". Patched: a refused Raw role is read as the camera's
  video stream, which is what uvcvideo answers for a USB camera.
- Two planes: picamera2 allocates each buffer as one dma-buf with one plane; libcamera 0.4.0's virtual
  camera writes NV12 into the buffer's second plane and aborts (`Assertion '__n < this->size()'`) on a
  one-plane buffer. Patched: an NV12 buffer is described as libcamera's own allocator would, two planes
  on the same dma-buf.
"""

from __future__ import annotations

import sys
from pathlib import Path

PYKMS = '''"""Stand-in for kms++'s Python binding, written by edgecam's lab (see lab/picamera2_virtual.py).
picamera2 imports it for its DRM preview only; pixel format names resolve, anything else is missing."""


class _Names(type):
    def __getattr__(cls, name: str) -> str:
        return name


class PixelFormat(metaclass=_Names):
    pass


def __getattr__(name: str) -> object:
    raise AttributeError(f"pykms stand-in (edgecam lab): no {name}; there is no DRM preview here")
'''

PATCHES = [
    ("picamera2/picamera2.py", 2,
     "raw_config = self.camera.generate_configuration([libcamera.StreamRole.Raw])\n",
     "raw_config = self.camera.generate_configuration([libcamera.StreamRole.Raw]) or "
     "self.camera.generate_configuration([libcamera.StreamRole.VideoRecording])  # edgecam lab\n"),
    ("picamera2/allocators/dmaallocator.py", 1,
     "                plane[0].length = stream_config.frame_size\n",
     "                plane[0].length = stream_config.frame_size\n"
     "                if str(stream_config.pixel_format) in ('NV12', 'NV21'):  # edgecam lab: two planes, one fd\n"
     "                    plane[0].length = stream_config.stride * stream_config.size.height\n"
     "                    plane.append(libcamera.FrameBuffer.Plane())\n"
     "                    plane[1].fd, plane[1].offset = plane[0].fd, plane[0].length\n"
     "                    plane[1].length = stream_config.frame_size - plane[0].length\n"),
]


def prepare(site: Path) -> None:
    (site / "pykms.py").write_text(PYKMS)
    for rel, count, old, new in PATCHES:
        path = site / rel
        text = path.read_text()
        if text.count(new) == count:
            continue  # already prepared
        if text.count(old) != count:
            sys.exit(f"picamera2_virtual: {rel}: expected {count} of {old.strip()!r}, found {text.count(old)}")
        path.write_text(text.replace(old, new))
    print("picamera2 prepared for the virtual camera")


def probe(out: Path) -> None:
    """One frame through edgecam's adapter with the main stream only, and one with main + lores (the
    overlay set-up), each printed with the format and size libcamera settled on; the first is saved."""
    import cv2

    from edgecam.device.sources import Picamera2Source

    for display in (None, (640, 480)):
        src = Picamera2Source((224, 224), display)
        src.open()
        try:
            frame = src.read()
        finally:
            src.close()
        streams = " ".join(f"{name}={fmt} {w}x{h}" for name, (fmt, (w, h)) in src.streams.items())
        shown = "" if frame.display is None else f", display {frame.display.shape[1]}x{frame.display.shape[0]}"
        print(f"{streams}: frame {frame.image.shape[1]}x{frame.image.shape[0]}{shown}")
        if display is None:
            cv2.imwrite(str(out), frame.image)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "probe"):
        sys.exit(__doc__.split("\n\n")[1])
    (prepare if sys.argv[1] == "prepare" else probe)(Path(sys.argv[2]))
