"""The clocks a device without a real-time clock can trust, and whether the wall clock is set.

A Pi 4 or Zero 2 W boots on the time saved at its last shutdown (fake-hwclock) until NTP
steps the wall clock, possibly by weeks. CLOCK_BOOTTIME never jumps within a boot (it
counts suspend too), and the boot id tells one boot from the next. The kernel's
STA_UNSYNC flag (adjtimex) says whether anything has set the wall clock since boot.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# EDGECAM_BOOT_ID_FILE is for tests only: a test cannot reboot the kernel, so it stands in a new
# kernel boot (a power cut, for the spool's runs) with a file of its own holding another id.
BOOT_ID = Path(os.environ.get("EDGECAM_BOOT_ID_FILE") or "/proc/sys/kernel/random/boot_id")
STA_UNSYNC = 0x0040  # <linux/timex.h>


def boottime() -> float:
    """Seconds since boot, suspend included; never steps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id from the kernel; empty where there is none (then every start looks like a new boot)."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class _Timex(ctypes.Structure):
    # The leading fields of struct timex; `long` is the platform's, as the kernel's ABI has it.
    # The rest of the structure (about 200 bytes) is room the call writes into.
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 512),
    )


_adjtimex: Callable[..., int] | None = None


def clock_synced() -> bool | None:
    """Whether the kernel reports the wall clock synchronised (STA_UNSYNC clear); None where it cannot tell."""
    global _adjtimex
    if _adjtimex is None:
        try:
            _adjtimex = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).adjtimex
        except (OSError, AttributeError):
            _adjtimex = lambda _t: -1  # noqa: E731 - no libc adjtimex (not Linux): unknown, every time
    tx = _Timex()  # modes = 0: read only, needs no privilege
    if _adjtimex(ctypes.byref(tx)) < 0:
        return None
    return not tx.status & STA_UNSYNC


@dataclass(frozen=True)
class Clocks:
    """Where the spool reads time (tests give it their own).

    `wall` stamps `created` (informative), `uptime` measures ages, `boot` names the boot
    `uptime` belongs to.
    """

    wall: Callable[[], float] = time.time
    uptime: Callable[[], float] = boottime
    boot: Callable[[], str] = boot_id
