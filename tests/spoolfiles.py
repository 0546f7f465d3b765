"""Spool files as a failing SD card leaves them: which rows sit on which page, read from the file's
bytes (SQLite's b-tree format) rather than asked of SQLite, and pages overwritten."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from edgecam.contract import result_identity


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for k in range(9):
        byte = data[pos + k]
        if k == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + k + 1
    raise AssertionError("unreachable")


def btree_pages(path: Path) -> dict[int, tuple[int, list[int]]]:
    """Table b-tree pages after page 1: number -> (type byte, row ids for a leaf or child pages for an interior)."""
    data = path.read_bytes()
    ps = int.from_bytes(data[16:18], "big")
    pages: dict[int, tuple[int, list[int]]] = {}
    for n in range(2, len(data) // ps + 1):
        off = (n - 1) * ps
        kind, cells = data[off], int.from_bytes(data[off + 3 : off + 5], "big")
        if kind not in (0x0D, 0x05):
            continue
        head = 8 if kind == 0x0D else 12
        found = []
        for c in range(cells):
            cell = off + int.from_bytes(data[off + head + 2 * c : off + head + 2 * c + 2], "big")
            if kind == 0x0D:
                _, pos = _varint(data, cell)  # payload size, then the row id
                found.append(_varint(data, pos)[0])
            else:
                found.append(int.from_bytes(data[cell : cell + 4], "big"))  # child page
        if kind == 0x05:
            found.append(int.from_bytes(data[off + 8 : off + 12], "big"))  # the right-most child
        pages[n] = (kind, found)
    return pages


def leaves_of(path: Path, ids: list[int]) -> dict[int, list[int]]:
    """The outbox's leaf pages (the row ids on each), in page order."""
    known = set(ids)
    db = sqlite3.connect(str(path))
    try:
        # The other tables (clock, runs) are one page each, their root: none is the outbox's.
        others = {n for (n,) in db.execute("SELECT rootpage FROM sqlite_master WHERE name != 'outbox'")}
    finally:
        db.close()
    return {n: rows for n, (kind, rows) in btree_pages(path).items()
            if kind == 0x0D and n not in others and set(rows) <= known}


def damage(path: Path, pages: list[int], how: str = "zeroed") -> None:
    """Overwrite whole pages with zeroes or (seeded) random bytes, as a failing card would."""
    rng = random.Random(f"{path.name}{pages}")
    with path.open("r+b") as f:
        for n in pages:
            f.seek((n - 1) * 4096)
            f.write(bytes(4096) if how == "zeroed" else rng.randbytes(4096))


def spooled_seqs(path: Path) -> list[tuple[str, int]]:
    """(boot, seq) of each result row in a spool file, oldest first (a payload stored as TEXT read too)."""
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'result' ORDER BY id").fetchall()
    finally:
        db.close()
    payloads = [p.encode() if isinstance(p, str) else bytes(p) for (p,) in rows]
    return [got for p in payloads if (got := result_identity(p)) is not None]

