"""The device's clocks (edgecam.device.clock), read from the real kernel."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from edgecam.device.clock import BOOT_ID, boot_id, boottime, clock_synced

TIME_ERROR = 5  # adjtimex's return value while the clock is unsynchronised (<linux/timex.h>)


def test_boottime_is_the_kernel_s_time_since_boot() -> None:
    # /proc/uptime counts from boot with suspend included, as CLOCK_BOOTTIME does.
    before = boottime()
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    after = boottime()
    assert before - 0.05 <= uptime <= after + 0.05
    assert before <= after


def test_boot_id_is_this_boot_s() -> None:
    got = boot_id()
    assert got == BOOT_ID.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", got)
    assert boot_id(Path("/nonexistent/boot_id")) == ""  # no id: every start counts as a new boot


def test_clock_synced_agrees_with_the_kernel_s_answer() -> None:
    # The flag edgecam reads from the structure must agree with the call's own return value, which
    # the kernel sets to TIME_ERROR while STA_UNSYNC is set: a wrong structure layout would not.
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(1024)
    for _ in range(3):
        state = libc.adjtimex(buf)
        synced = clock_synced()
        if libc.adjtimex(buf) == state:  # the kernel did not change its mind in between
            break
    assert synced is not None
    assert synced == (state != TIME_ERROR)
