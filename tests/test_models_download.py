"""`edgecam models fetch` the way an install uses it, from a loopback HTTP server that misbehaves:
a connection that breaks off (resumed with a Range request, or restarted), a slow server
(progress on stderr), a corrupted file (refused by its sha256), a server that keeps failing."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import DEFAULT_MODEL, MODELS, one_error_line, run_cli

NAME = "tf2_mobilenet_v2_1.0_224_ptq"


class Server:
    """Serves ../shared/models under /<behaviour>/<file>, and records each request's Range header."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.failed: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                mode, _, name = self.path.lstrip("/").partition("/")
                outer.requests.append((self.path, self.headers.get("Range")))
                file = MODELS / name
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                if mode == "corrupt":
                    data = data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:]
                start = 0
                rng = self.headers.get("Range")
                if rng and mode in ("resume", "always-drop"):
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)  # "restart" ignores ranges, as many simple servers do
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                first = self.path not in outer.failed
                if (mode in ("resume", "restart") and first) or mode == "always-drop":
                    outer.failed.add(self.path)
                    self.wfile.write(body[: len(body) // 3])  # then the connection breaks off
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if mode == "slow":
                    for i in range(0, len(body), 1 << 16):
                        self.wfile.write(body[i : i + (1 << 16)])
                        self.wfile.flush()
                        time.sleep(0.04)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def cached(cache: Path) -> Path:
    return cache / NAME / f"{NAME}.tflite"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_download_resumes_with_a_range(server: Server, model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", f"{server.url}/resume")
    assert proc.returncode == 0, proc.stderr
    assert sha(cached(model_cache)) == sha(DEFAULT_MODEL)
    model_requests = [r for r in server.requests if r[0].endswith(".tflite")]
    assert len(model_requests) == 2 and model_requests[0][1] is None
    size = DEFAULT_MODEL.stat().st_size
    assert model_requests[1][1] == f"bytes={size // 3}-"  # picked up where it broke off
    assert "interrupted at" in proc.stderr and "resuming" in proc.stderr


def test_interrupted_download_restarts_when_the_server_ignores_ranges(server: Server, model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", f"{server.url}/restart")
    assert proc.returncode == 0, proc.stderr
    assert sha(cached(model_cache)) == sha(DEFAULT_MODEL)
    assert len([r for r in server.requests if r[0].endswith(".tflite")]) == 2


def test_slow_server_shows_progress(server: Server, model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", f"{server.url}/slow")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{NAME}.tflite: ")]
    percents = [int(line.split(": ")[1].split("%")[0]) for line in lines]
    assert len(percents) >= 3 and percents == sorted(percents) and percents[-1] == 100, proc.stderr
    assert "MB of" in lines[-1]


def test_corrupted_file_is_refused_and_nothing_installed(server: Server, model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", f"{server.url}/corrupt")
    assert proc.returncode == 2
    one_error_line(proc, "sha256 mismatch", "not installed")
    assert not cached(model_cache).exists()
    assert not any(p.suffix == ".part" for p in model_cache.rglob("*"))


def test_a_server_that_keeps_failing_gives_up_with_one_error(server: Server, model_cache: Path) -> None:
    proc = run_cli("models", "fetch", "--mirror", f"{server.url}/always-drop")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("edgecam: error:")]
    assert len(errors) == 1 and "cannot download" in errors[0] and "Traceback" not in proc.stderr
    assert proc.stderr.count("resuming") == 3
    assert not cached(model_cache).exists()
    assert not any(p.suffix == ".part" for p in model_cache.rglob("*"))
