"""`edgecam` with its wall clock stepped by a test: time.time() plus the seconds written in a file.

    python tests/stepped_clock.py OFFSET_FILE ARGS...   (ARGS as for `edgecam`)

Only the wall clock moves, as when NTP steps the clock of a device that booted on fake-hwclock's
stale time; CLOCK_BOOTTIME and the monotonic clock go on untouched, as they do on a device. The
step is put in before edgecam is imported, so everything that reads the wall clock sees it.
(libfaketime cannot do this for Python: with its monotonic clocks left alone, time.sleep fails
with EINVAL.)
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    offset_file = Path(sys.argv[1])
    offset = [0.0]

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):  # being written: the next read has it
            offset[0] = float(offset_file.read_text().strip() or 0)

    def follow() -> None:
        while True:
            read()
            time.sleep(0.05)

    read()
    threading.Thread(target=follow, name="stepped-clock", daemon=True).start()
    real = time.time
    time.time = lambda: real() + offset[0]

    from edgecam.cli import main as edgecam

    return edgecam(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
