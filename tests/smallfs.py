"""Small real filesystems for the disk-full tests: a tmpfs of a given size, mounted for one test.

Mounting needs root, or a user namespace of one's own. As root (CI runs tests/run.sh as
root) the tmpfs is mounted directly. Otherwise tests marked `mounts` are run again, each
in a new user and mount namespace (`unshare --user --map-root-user --mount`, see
conftest.py), where an ordinary user may mount a tmpfs; the outcome there is the test's
outcome here. Only where neither works are they skipped, and loudly: the skip names what
was tried, and with EDGECAM_REQUIRE_MOUNTS=1 (tests/run.sh sets it) they fail instead.
"""

from __future__ import annotations

import errno
import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE = "EDGECAM_REQUIRE_MOUNTS"


def cannot_mount(why: str) -> None:
    """Skip loudly, or fail where mounting is required."""
    msg = (f"DISK-FULL TEST NOT RUN: cannot mount a small tmpfs here ({why}). Run as root, or where "
           f"`unshare --user --map-root-user --mount true` works; CI runs it as root ({REQUIRE}=1).")
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(msg)
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


def mount(where: Path, size: int, options: str = "") -> None:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={max(size // 1024, 4)}k" + (f",{options}" if options else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        cannot_mount(proc.stderr.strip() or f"mount exited {proc.returncode}")


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount_read_only(where: Path) -> None:
    proc = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A `size`-byte tmpfs at `where` for the duration."""
    mount(where, size)
    try:
        yield where
    finally:
        unmount(where)


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def used_share(where: Path) -> float:
    st = os.statvfs(where)
    return 1 - st.f_bavail / st.f_blocks


def fill_the_disk(path: Path) -> None:
    """Something else takes every last byte: write `path` until the filesystem refuses."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0" * 4096, b"\0"):
            while True:
                try:
                    if os.write(fd, chunk) == 0:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)


@contextmanager
def read_only_file(path: Path) -> Iterator[Path]:
    """`path` made read-only by a read-only bind mount of the file itself (its directory stays
    writable, as for a file that lost its write permission): root ignores file modes."""
    proc = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        cannot_mount(proc.stderr.strip() or f"mount exited {proc.returncode}")
    proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        unmount(path)
        cannot_mount(proc.stderr.strip() or f"mount exited {proc.returncode}")
    try:
        yield path
    finally:
        unmount(path)
