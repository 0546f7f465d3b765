"""The model manifest, the model cache, and fetching by URL + sha256."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from edgecam.core.errors import EdgecamError
from edgecam.core.normalization import Normalization, normalization

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.toml"
_PACKAGED_MANIFEST = Path(__file__).resolve().parents[1] / "manifest.toml"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    url: str
    sha256: str
    labels_url: str | None = None
    labels_sha256: str | None = None
    description: str = ""
    input_mean: Any = None  # one number or one per channel, pixel units (0..255)
    input_std: Any = None

    @property
    def normalization(self) -> Normalization | None:
        if self.input_mean is None and self.input_std is None:
            return None
        return normalization(self.input_mean, self.input_std, "manifest", f"models.{self.name}")

    @property
    def filename(self) -> str:
        return _basename(self.url)

    @property
    def labels_filename(self) -> str | None:
        return _basename(self.labels_url) if self.labels_url else None


@dataclass(frozen=True)
class Manifest:
    default: str
    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry:
        if name not in self.models:
            raise EdgecamError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))} (or give a path)")
        return self.models[name]


def _basename(url: str) -> str:
    return Path(urllib.parse.urlparse(url).path).name


def manifest_path() -> Path:
    env = os.environ.get("EDGECAM_MANIFEST")
    if env:
        return Path(env)
    return MANIFEST if MANIFEST.exists() else _PACKAGED_MANIFEST


def load_manifest(path: Path | None = None) -> Manifest:
    path = path or manifest_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgecamError(f"{path}: model manifest not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgecamError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise EdgecamError(f"{path}: model manifest is not UTF-8 text") from None
    except OSError as exc:
        raise EdgecamError(f"{path}: cannot read model manifest ({exc.strerror or exc})") from None
    table = data.get("models") or {}
    if not isinstance(table, dict):
        raise EdgecamError(f"{path}: 'models' must be a table of [models.NAME] entries")
    models = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise EdgecamError(f"{path}: models.{name} must be a table")
        for key in ("url", "sha256"):
            if not isinstance(entry.get(key), str):
                raise EdgecamError(f"{path}: models.{name}.{key} is missing or not a string")
        unknown = set(entry) - {"url", "sha256", "labels_url", "labels_sha256", "description", "input_mean",
                                "input_std"}
        if unknown:
            raise EdgecamError(f"{path}: models.{name}: unknown key {sorted(unknown)[0]!r}")
        if entry.get("labels_url") and not isinstance(entry.get("labels_sha256"), str):
            raise EdgecamError(f"{path}: models.{name}.labels_sha256 is missing (labels_url needs it)")
        models[name] = ModelEntry(name=name, **entry)
        try:
            models[name].normalization  # noqa: B018 - checked now, so a bad manifest fails at load
        except EdgecamError as exc:
            raise EdgecamError(f"{path}: {exc}") from None
    default = data.get("default", "")
    if default not in models:
        raise EdgecamError(f"{path}: default model {default!r} is not listed under [models]")
    return Manifest(default, models)


def cache_dir() -> Path:
    env = os.environ.get("EDGECAM_MODEL_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecam" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source(url: str, mirror: str | None) -> str:
    """Where to get a file: the mirror (directory or URL) by basename, else its own URL."""
    if not mirror:
        return url
    name = _basename(url)
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(mirror) / name)


def _download(source: str, dest: Path, sha256: str, timeout: float = 60.0) -> None:
    """Copy `source` to `dest` atomically, only if its sha256 matches."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise EdgecamError(f"{dest.parent}: cannot write to the model cache ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out:
            if "://" in source:
                _fetch_url(source, out, timeout, Progress(dest.name))
            else:
                try:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 16)
                except OSError as exc:
                    raise EdgecamError(f"{source}: cannot read ({exc.strerror or exc})") from None
        got = sha256_file(tmp)
        if got != sha256:
            raise EdgecamError(f"{source}: sha256 mismatch: expected {sha256}, got {got}; the file was not installed")
        os.chmod(tmp, 0o644)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


RETRIES = 3


def _fetch_url(url: str, out: BinaryIO, timeout: float, progress: Progress) -> None:
    """HTTP(S) download into `out`. A connection that breaks off is resumed where it stopped
    (a Range request), or restarted when the server does not do ranges; up to RETRIES times."""
    got, total, failures = 0, 0, 0
    while True:
        request = urllib.request.Request(url, headers={"Range": f"bytes={got}-"} if got else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                if got and resp.status != 206:
                    out.seek(0)
                    out.truncate()
                    got = 0
                length = int(resp.headers.get("Content-Length") or 0)
                total = got + length if length else 0
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)
                    got += len(chunk)
                    progress.update(got, total)
            if total and got < total:
                raise http.client.IncompleteRead(b"", total - got)
            progress.done(got)
            return
        except urllib.error.HTTPError as exc:
            progress.done(got, failed=True)
            raise EdgecamError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
            failures += 1
            reason = _why(exc)
            if failures > RETRIES or (got == 0 and isinstance(exc, urllib.error.URLError)):
                progress.done(got, failed=True)
                raise EdgecamError(f"{url}: cannot download ({reason})") from None
            progress.note(f"interrupted at {_mb(got)} ({reason}); resuming, try {failures + 1} of {RETRIES + 1}")
            time.sleep(min(2.0, 0.5 * failures))


def _why(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed early"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return " ".join(str(reason).split()) or type(exc).__name__


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """Download progress on stderr: a bar redrawn in place on a terminal, else a line every 10%."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = -1
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, got: int, total: int) -> None:
        now = time.monotonic()
        if now - self.started < 1.0:
            return  # quick downloads say nothing
        if total:
            pct = 100 * got // total
            if self.tty:
                if now - self.last >= 0.2:
                    self.last = now
                    self._write(f"\r{self.name}: {pct:3d}% ({_mb(got)} of {_mb(total)})", end="")
            elif pct // 10 > self.shown:
                self.shown = pct // 10
                self._write(f"{self.name}: {pct}% ({_mb(got)} of {_mb(total)})")
        elif now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self._write(("\r" if self.tty else "") + f"{self.name}: {_mb(got)}", end="" if self.tty else "\n")

    def note(self, text: str) -> None:
        self._write(("\n" if self.tty and self.shown >= 0 else "") + f"{self.name}: {text}")

    def done(self, got: int, failed: bool = False) -> None:
        if self.tty and time.monotonic() - self.started >= 1.0:
            self._write("")

    def _write(self, text: str, end: str = "\n") -> None:
        self.stream.write(text + end)
        self.stream.flush()


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    labels: Path | None
    normalization: Normalization | None = None  # the manifest's, for a known model


def _cached(entry: ModelEntry, cache: Path) -> LocalModel:
    labels = cache / entry.name / entry.labels_filename if entry.labels_filename else None
    return LocalModel(entry.name, cache / entry.name / entry.filename, labels)


def fetch(entry: ModelEntry, cache: Path | None = None, mirror: str | None = None) -> tuple[LocalModel, list[str]]:
    """Makes sure the model and its labels are in the cache; returns it and what was downloaded."""
    cache = cache or cache_dir()
    mirror = mirror if mirror is not None else os.environ.get("EDGECAM_MODEL_MIRROR") or None
    local = _cached(entry, cache)
    done = []
    wanted = [(entry.url, entry.sha256, local.path)]
    if entry.labels_url and local.labels and entry.labels_sha256:
        wanted.append((entry.labels_url, entry.labels_sha256, local.labels))
    for url, sha, dest in wanted:
        if dest.exists() and sha256_file(dest) == sha:
            continue
        src = _source(url, mirror)
        _download(src, dest, sha)
        done.append(src)
    return local, done


def resolve(model: str | None, labels: str | None = None, fetch_missing: bool = True) -> LocalModel:
    """A model given by manifest name (fetched into the cache if missing) or by path."""
    manifest = load_manifest()
    name = model or manifest.default
    label_path = Path(labels) if labels else None
    path = Path(name)
    if name not in manifest.models and (path.suffix == ".tflite" or path.exists() or os.sep in name):
        known = _known_entry(path, manifest)
        if label_path is None and known is not None:
            label_path = _labels_beside(known, path)
        return LocalModel(path.stem, path, label_path, known.normalization if known else None)
    entry = manifest.get(name)
    local = _cached(entry, cache_dir())
    if not local.path.exists() or (local.labels and not local.labels.exists()):
        if not fetch_missing:
            raise EdgecamError(f"model {name!r} is not in the cache {cache_dir()}; run: edgecam models fetch {name}")
        local, _ = fetch(entry)
    return LocalModel(local.name, local.path, label_path or local.labels, entry.normalization)


def _known_entry(path: Path, manifest: Manifest) -> ModelEntry | None:
    """The manifest's entry for a model file under another path (same sha256)."""
    try:
        digest = sha256_file(path)
    except OSError:
        return None  # the loader reports the unreadable model with its own message
    return next((e for e in manifest.models.values() if e.sha256 == digest), None)


def _labels_beside(entry: ModelEntry, path: Path) -> Path | None:
    """A known model's labels: beside the file, else in the cache."""
    if not entry.labels_filename:
        return None
    beside = path.parent / entry.labels_filename
    if beside.exists():
        return beside
    cached = _cached(entry, cache_dir()).labels
    return cached if cached and cached.exists() else None
