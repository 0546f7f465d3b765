"""`edgecam dashboard` attacked over HTTP: cross-site commands, foreign Host names (DNS rebinding),
bodies that lie about their length, idle and slow sockets, too many event streams, and tokens on
the command line and in the log. The real dashboard process, a real Mosquitto; requests are
written on raw sockets where a client library would tidy them up."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from broker import Broker
from conftest import one_error_line, run_cli
from paho.mqtt.enums import CallbackAPIVersion
from test_dashboard_http import WAIT, Dashboard, Events, wait_until
from test_dashboard_http import dashboard as dashboard  # the fixture

from edgecam.web.dashboard import MAX_CONNECTIONS, MAX_STREAMS, REQUEST_TIMEOUT_S

COMMAND = json.dumps({"device": "cam-1", "cmd": {"cmd": "ping"}}).encode()


def raw(port: int, data: bytes, timeout: float = WAIT) -> tuple[int, str, bytes]:
    """Sends bytes as they are; the status, the header block and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        send_until_answered(s, [data[at:at + (1 << 16)] for at in range(0, len(data), 1 << 16)])
        return read_response(s)


def send_until_answered(s: socket.socket, chunks: Iterable[bytes]) -> int:
    """Sends chunk after chunk until the server answers (or stops taking them); how much was sent.
    An answer is read as soon as it comes, before the server's close can reset the connection."""
    sent = 0
    with refused_midway():
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break
            s.sendall(chunk)
            sent += len(chunk)
    return sent


def refused_midway() -> contextlib.suppress:
    """A server that answers early and closes may refuse the rest of what we send."""
    return contextlib.suppress(BrokenPipeError, ConnectionResetError)


def read_response(s: socket.socket) -> tuple[int, str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed without a full answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    m = re.search(r"(?im)^content-length:\s*(\d+)", text)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(text.split()[1]), text, body


def post(port: int, headers: dict[str, str], body: bytes = COMMAND, path: str = "/api/cmd") -> tuple[int, str, bytes]:
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def get(port: int, path: str, host: str | None) -> tuple[int, str, bytes]:
    return raw(port, f"GET {path} HTTP/1.1\r\n".encode() + (f"Host: {host}\r\n" if host is not None else "").encode()
               + b"Connection: close\r\n\r\n")


def one_line(body: bytes) -> str:
    """A refusal's reason: one line, as JSON's error or as plain text."""
    text = body.decode()
    if text.startswith("{"):
        text = json.loads(text)["error"]
    assert text.strip() and "\n" not in text.strip(), text
    assert "Traceback" not in text
    return text.strip()


class Device:
    """What reaches a device: a client on the broker subscribed to cam-1's commands, answering
    each as the daemon would."""

    def __init__(self, broker: Broker) -> None:
        self.commands: list[dict[str, Any]] = []
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._command
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe("edgecam/+/cmd", qos=1)
        assert subscribed.wait(WAIT)

    def _command(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        cmd = json.loads(msg.payload)
        self.commands.append(cmd)
        client.publish(msg.topic + "/reply", json.dumps({"id": cmd["id"], "ok": True, "device": "cam-1"}), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker: Broker) -> Iterator[Device]:
    d = Device(broker)
    yield d
    d.close()


# -- 3: cross-site requests ------------------------------------------------------------------


def test_a_command_from_another_site_never_reaches_the_device(dashboard: Callable[..., Dashboard],
                                                              device: Device) -> None:
    dash = dashboard("--username", "dash")
    host = f"127.0.0.1:{dash.port}"
    refused = [
        # The attack as found: a page elsewhere posting text/plain (no preflight needed).
        ({"Host": host, "Origin": "https://evil.example", "Content-Type": "text/plain"}, 403, "evil.example"),
        ({"Host": host, "Origin": "https://evil.example", "Content-Type": "application/json"}, 403, "evil.example"),
        ({"Host": host, "Origin": "null", "Content-Type": "application/json"}, 403, "null"),
        # Another web app on this machine is another site too.
        ({"Host": host, "Origin": "http://127.0.0.1:3000", "Content-Type": "application/json"}, 403, "3000"),
        ({"Host": host, "Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403, "cross-site"),
        # The page's own origin, but not JSON: a form or a text/plain fetch from anywhere would look so.
        ({"Host": host, "Origin": f"http://{host}", "Content-Type": "text/plain"}, 415, "application/json"),
        ({"Host": host, "Origin": f"http://{host}"}, 415, "application/json"),
        ({"Host": "evil.example", "Content-Type": "application/json"}, 403, "evil.example"),
    ]
    for headers, status, needle in refused:
        got, _, body = post(dash.port, {**headers, "Content-Length": str(len(COMMAND))})
        assert got == status, (headers, got, body)
        assert needle in one_line(body), (headers, body)

    # The dashboard's own page (its origin is what Host says), and a script with no Origin, get through.
    for headers in ({"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}, {"Host": host}):
        got, _, body = post(dash.port, {**headers, "Content-Type": "application/json; charset=utf-8",
                                        "Content-Length": str(len(COMMAND))})
        assert got == 200 and json.loads(body)["ok"] is True, body
    # Commands go out in order over one connection: had a refused one been sent, it would be here first.
    assert [c["cmd"] for c in device.commands] == ["ping", "ping"], device.commands


def test_the_page_cannot_be_framed_by_another_site(dashboard: Callable[..., Dashboard]) -> None:
    status, headers, _ = dashboard().get("/")
    assert status == 200
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"  # the token in the page's address goes nowhere


def test_a_foreign_host_is_refused_everywhere(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard("--allow-host", "cams.example", "--allow-host", "pi4.lan.")
    for path in ("/api/state", "/", "/events", "/overlay/cam-1.jpg", "/healthz"):
        for host in ("evil.example", f"evil.example:{dash.port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            status, _, body = get(dash.port, path, host)
            assert status == 403, (path, host, status, body[:200])
            assert host.split(":")[0] in one_line(body) and "--allow-host" in one_line(body)
    # Loopback names, addresses (a page loaded from an address has it as its origin: nothing to
    # rebind), and the names allowed, with or without a port, in any case.
    for host in (f"127.0.0.1:{dash.port}", f"localhost:{dash.port}", "LOCALHOST", "[::1]:8080", "10.1.2.3",
                 "cams.example", "CAMS.example:443", "pi4.lan", "pi4.lan.:8080", None):
        status, _, body = get(dash.port, "/api/state", host)
        assert status == 200, (host, status, body[:200])
        assert "devices" in json.loads(body)


# -- 4: bodies ---------------------------------------------------------------------------------


def peak_rss_kib(pid: int) -> int:
    return int(re.search(r"VmHWM:\s*(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_lying_content_lengths_get_one_line_and_nothing_is_buffered(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard("--username", "dash")
    host = f"127.0.0.1:{dash.port}"
    base = {"Host": host, "Content-Type": "application/json"}
    for length, status in (("abc", 400), ("-1", 400), ("+12", 400), ("1e3", 400), ("9" * 5000, 413),
                           ("4097", 413), ("99999999999999999999", 413)):
        got, _, body = post(dash.port, {**base, "Content-Length": length}, body=b"")
        assert got == status, (length, got, body)
        assert "Content-Length" in one_line(body) or "limit" in one_line(body), body
    got, _, body = post(dash.port, base, body=b"")
    assert got == 411 and "Content-Length" in one_line(body)
    got, _, body = post(dash.port, {**base, "Transfer-Encoding": "chunked"}, body=b"5\r\nhello\r\n0\r\n\r\n")
    assert got == 411, body
    got, _, body = post(dash.port, {**base, "Content-Length": "3", "content-length": "4"}, body=b"abcd")
    assert got == 400 and "more than one" in one_line(body)

    # A negative length followed by a big body: answered at once, the body never held.
    before = peak_rss_kib(dash.proc.pid)
    with socket.create_connection(("127.0.0.1", dash.port), timeout=WAIT) as s:
        s.sendall(f"POST /api/cmd HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  "Content-Length: -1\r\n\r\n".encode())
        sent = send_until_answered(s, (b"x" * (1 << 20) for _ in range(200)))
        status, _, body = read_response(s)
    assert status == 400 and "-1" in one_line(body)
    assert sent < 200 << 20, "the dashboard took 200 MB of a body it should have refused"
    assert peak_rss_kib(dash.proc.pid) - before < 20_000
    assert dash.state()["broker"] is True  # still serving
    assert "Traceback" not in dash.log()


def test_the_token_is_checked_before_a_body_is_read(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard("--username", "dash", "--token", "tok", token="tok")
    with socket.create_connection(("127.0.0.1", dash.port), timeout=WAIT) as s:
        # The headers announce a body that never comes: the answer must not wait for it.
        s.sendall(f"POST /api/cmd HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 4000\r\n\r\n".encode())
        status, head, body = read_response(s)  # timed out instead, it would close with no answer
    assert status == 401 and "token" in one_line(body), body
    assert re.search(r"(?im)^connection: close", head)  # the body is unread: this connection is done


# -- 6: idle and slow sockets, event streams ---------------------------------------------------


def threads_of(pid: int) -> int:
    return int(re.search(r"Threads:\s*(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_half_open_connections_neither_pile_up_threads_nor_stay(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    idle = threads_of(dash.proc.pid)
    socks = []
    try:
        for _ in range(400):
            s = socket.create_connection(("127.0.0.1", dash.port), timeout=WAIT)
            s.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end of it
            socks.append(s)
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        closed, most = 0, 0
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + WAIT
        while closed < len(socks) and time.monotonic() < deadline:
            most = max(most, threads_of(dash.proc.pid))
            for key, _ in sel.select(0.2):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    closed += 1
        assert closed == len(socks), f"{len(socks) - closed} half-open connections still held"
        assert most <= idle + MAX_CONNECTIONS, (most, idle)
    finally:
        for s in socks:
            s.close()
    assert dash.state()["broker"] is True
    assert "connections open, the most it serves" in dash.log()


def test_a_request_trickled_in_is_cut_off(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    with socket.create_connection(("127.0.0.1", dash.port), timeout=1) as s:
        s.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start, got = time.monotonic(), b""
        while time.monotonic() - start < REQUEST_TIMEOUT_S + WAIT:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # each read finds a byte; only a deadline for the whole request helps
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue  # a second's pace
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        took = time.monotonic() - start
    assert took < REQUEST_TIMEOUT_S + WAIT, "a request sent a header a second was never cut off"
    assert b"200 OK" not in got, got


def test_event_streams_are_capped_and_the_log_says_so_once(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    streams = [Events(dash.port) for _ in range(MAX_STREAMS)]
    try:
        for e in streams:
            assert e.resp.status == 200 and e.next()[0] == "snapshot"
        for _ in range(5):
            status, _, body = get(dash.port, "/events", f"127.0.0.1:{dash.port}")
            assert status == 503, (status, body)
            assert f"{MAX_STREAMS} pages are open" in one_line(body)
        assert dash.log().count("event streams open, the most it serves") == 1
        assert dash.state()["broker"] is True  # the rest is served

        streams.pop().close()

        def another() -> Events | None:
            e = Events(dash.port)
            if e.resp.status == 200:
                return e
            e.close()
            return None

        more = wait_until(another, what="a stream after one closed")
        streams.append(more)
        assert more.next()[0] == "snapshot"
        refused = re.findall(rf"refused (\d+) event streams while at the limit of {MAX_STREAMS}", dash.log())
        assert len(refused) == 1 and int(refused[0]) >= 5, dash.log()
    finally:
        for e in streams:
            e.close()


# -- 10: the token out of ps and out of the log ----------------------------------------------


def test_the_token_from_a_file_stays_out_of_ps_and_the_log(dashboard: Callable[..., Dashboard],
                                                           tmp_path: Path) -> None:
    token = "Zq7-file-T0ken"
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    dash = dashboard("--token-file", str(path), "-v", token=token)
    assert token not in Path(f"/proc/{dash.proc.pid}/cmdline").read_bytes().decode()
    assert dash.get("/api/state")[0] == 401
    for query in (f"?token={token}", f"?x=1&token={token}", f"?%74oken={token}"):
        assert dash.get("/api/state" + query)[0] == 200, query
    assert dash.get("/api/state", headers={"Authorization": f"Bearer {token}"})[0] == 200
    with socket.create_connection(("127.0.0.1", dash.port), timeout=WAIT) as s:
        s.sendall(f"GET /?token={token} HTTP/1.1 extra\r\n\r\n".encode())  # a bad request line, logged whole
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert b"400" in answer, answer
    wait_until(lambda: dash.log().count("token=<redacted>") >= 3, what="the request lines, redacted")
    log = dash.log()
    assert token not in log, log
    assert "can be read by other users" not in log  # it is 600


def test_the_token_on_the_command_line_is_warned_about_and_never_logged(dashboard: Callable[..., Dashboard]) -> None:
    token = "Kp2-argv-T0ken"
    dash = dashboard("--token", token, "-v", token=token)
    assert dash.get(f"/api/state?token={token}")[0] == 200
    wait_until(lambda: "token=<redacted>" in dash.log(), what="the request line, redacted")
    log = dash.log()
    assert token not in log, log
    assert "--token is visible" in log and "--token-file" in log


def test_a_readable_token_file_is_warned_about(dashboard: Callable[..., Dashboard], tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("open-T0ken")
    path.chmod(0o644)
    dash = dashboard("--token-file", str(path), token="open-T0ken")
    assert "can be read by other users" in dash.log()


@pytest.mark.parametrize(
    ("content", "args", "needles"),
    [
        (None, ["--token-file", "/nonexistent/token"], ["--token-file", "/nonexistent/token", "cannot read"]),
        ("", ["--token-file", "{f}"], ["--token-file", "one line"]),
        ("two\nlines\n", ["--token-file", "{f}"], ["--token-file", "one line"]),
        ("tok", ["--token-file", "{f}", "--token", "x"], ["--token", "--token-file", "one of"]),
        (b"\xff\xfe", ["--token-file", "{f}"], ["--token-file", "cannot read"]),
    ],
)
def test_token_file_errors_are_one_line(tmp_path: Path, content: str | bytes | None, args: list[str],
                                        needles: list[str]) -> None:
    f = tmp_path / "token"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    proc = run_cli("dashboard", "--broker", "127.0.0.1:1", *(a.replace("{f}", str(f)) for a in args), timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc, *needles)


def test_the_environment_token_is_not_logged(broker: Broker, dashboard: Callable[..., Dashboard],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "EDGECAM_DASHBOARD_TOKEN", "Env-T0ken-9")
    dash = dashboard("-v", token="Env-T0ken-9")
    assert dash.get("/api/state")[0] == 401
    wait_until(lambda: "token=<redacted>" in dash.log(), what="the request line, redacted")
    assert "Env-T0ken-9" not in dash.log()


def test_headers_too_large_are_refused_before_they_are_all_taken(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    before = peak_rss_kib(dash.proc.pid)
    head = f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n".encode()
    filler = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"y" * 60_000) for i in range(90))  # 5.4 MB, under 100 lines
    status, _, body = raw(dash.port, head + filler + b"\r\n")
    assert status == 431 and "KiB" in one_line(body), (status, body[:200])
    assert peak_rss_kib(dash.proc.pid) - before < 20_000
    assert dash.state()["broker"] is True
