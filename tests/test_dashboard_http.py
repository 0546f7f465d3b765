"""`edgecam dashboard` over HTTP: a real Mosquitto, a real dashboard process, real daemons.

Messages reach the dashboard only through the broker: results built with edgecam.contract, and
bad data of every kind, published as any client on the broker could.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from broker import Broker, free_port, paho_client, publish
from conftest import IMAGES, ROOT, one_error_line, run_cli

from edgecam.broker import join_host_port
from edgecam.contract import result_payload

MODEL = "tf2_mobilenet_v2_1.0_224_ptq"
CAM = (np.arange(49, dtype=np.float32).reshape(7, 7) - 10.0) / 4.0
WAIT = 30.0  # seconds for anything that should happen at once; generous for a loaded machine


def result(device: str = "cam-1", seq: int = 1, label: str = "chickadee", score: float = 0.8633) -> bytes:
    return result_payload(
        device=device, boot="9f2c41d0", seq=seq, ts=time.time(), model=MODEL,
        top=[(20, label, score), (19, "magpie", 0.0312), (21, "water ouzel, dipper", 0.0156)],
        cam_id=20, cam_label=label, cam=CAM, timing_ms={"total": 2.71},
    )


def jpeg() -> bytes:
    img = np.zeros((24, 32, 3), np.uint8)
    img[:, :16] = (0, 128, 255)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def wait_until(check: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Polls `check` until it returns something true; that value, or an assertion error."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what} (last: {last!r})")


class Dashboard:
    """`edgecam dashboard` as a subprocess, its log in a file."""

    def __init__(self, broker: Broker, log: Path, *args: str, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, free_port(host)
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgecam", "dashboard", "--broker", broker.address,
                 "--listen", join_host_port(host, self.port), *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = WAIT) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def state(self, query: str = "") -> dict[str, Any]:
        status, headers, body = self.get("/api/state" + query)
        assert status == 200, (status, body)
        assert headers["content-type"] == "application/json"
        return json.loads(body)

    def device(self, dev: str) -> dict[str, Any] | None:
        return next((d for d in self.state()["devices"] if d["id"] == dev), None)

    def post_cmd(self, body: bytes, timeout: float = WAIT) -> tuple[int, dict[str, Any]]:
        status, headers, raw = self.request("POST", "/api/cmd", body=body,
                                            headers={"Content-Type": "application/json"}, timeout=timeout)
        assert headers["content-type"] == "application/json", raw
        return status, json.loads(raw)

    def wait_ready(self, token: str = "") -> None:
        """Serving, and connected to the broker."""

        def up() -> bool:
            assert self.proc.poll() is None, self.log()
            with contextlib.suppress(OSError):
                status, _, body = self.get("/healthz", timeout=5)
                return status == 200 and body == b"ok\n"
            return False

        wait_until(up, what="GET /healthz")
        query = f"?token={token}" if token else ""
        wait_until(lambda: self.state(query)["broker"], what="the dashboard connected to the broker")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"the dashboard did not stop on SIGTERM: {self.log()}") from None
        return self.proc.returncode


@pytest.fixture
def dashboard(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    """Start dashboards with `dashboard(*args)`; each is stopped with SIGTERM after the test."""
    started: list[Dashboard] = []

    def start(*args: str, token: str = "", host: str = "127.0.0.1") -> Dashboard:
        d = Dashboard(broker, tmp_path / f"dashboard{len(started)}.log", *args, host=host)
        started.append(d)
        d.wait_ready(token)
        return d

    try:
        yield start
    finally:
        codes = [(d.stop(), d) for d in started]
    for code, d in codes:
        log = d.log()
        assert code == 0, log
        assert "Traceback" not in log, log


class Events:
    """A Server-Sent Events stream read as a browser's EventSource reads it."""

    def __init__(self, port: int, path: str = "/events", headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()

    def next(self) -> tuple[str, Any]:
        """The next event: its name and its data parsed as JSON. Comments (keepalives) are skipped."""
        name, data = "message", []
        while True:
            line = self.resp.readline()
            if not line:
                raise EOFError("the event stream ended")
            text = line.decode("utf-8").rstrip("\r\n")
            if not text:
                if data:
                    return name, json.loads("\n".join(data))
                name = "message"
                continue
            if text.startswith(":"):
                continue
            field, _, value = text.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)

    def until(self, check: Callable[[str, Any], bool], timeout: float = WAIT) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            name, data = self.next()
            if check(name, data):
                return name, data
            seen.append(name)
        raise AssertionError(f"no such event within {timeout:g} s; saw {seen}")

    def close(self) -> None:
        self.resp.close()  # it holds the socket open too
        self.conn.close()


def device_event(dev: str, seq: int) -> Callable[[str, Any], bool]:
    return lambda name, d: name == "device" and d["id"] == dev and (d["result"] or {}).get("seq") == seq


def seed(broker: Broker, dash: Dashboard, dev: str = "cam-1", seq: int = 1) -> dict[str, Any]:
    """A retained online status, then a result: what a running device leaves on the broker.

    The retained status reaches the dashboard however its subscription races with us; once it
    shows, the subscription is in place and a plain result reaches it too."""
    publish(broker.port, f"edgecam/{dev}/status", b"online", retain=True)
    wait_until(lambda: (dash.device(dev) or {}).get("status") == "online", what=f"{dev} online")
    publish(broker.port, f"edgecam/{dev}/result", result(dev, seq))
    return wait_until(lambda: (d := dash.device(dev)) and (d["result"] or {}).get("seq") == seq and d,
                      what=f"{dev} result {seq}")


# -- state, overlays ------------------------------------------------------------------------


def test_state_with_no_devices(dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    state = dash.state()
    assert state["devices"] == [] and state["controls"] is False
    assert state["bad_messages"] == 0 and state["broker"] is True and state["stale_after"] == 30.0
    status, headers, body = dash.get("/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"EventSource" in body and "default-src 'self'" in headers["content-security-policy"]
    assert dash.get("/nothing-here")[0] == 404


def test_results_and_overlays_from_the_broker(broker: Broker, dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    shown = seed(broker, dash, "cam-1", 1)
    assert shown["status"] == "online" and shown["stale"] is False
    assert [t["label"] for t in shown["result"]["top"]] == ["chickadee", "magpie", "water ouzel, dipper"]
    assert shown["result"]["top"][0]["score"] == 0.8633 and shown["model"] == MODEL
    assert shown["result"]["cam"]["w"] == 7 and shown["history"][0][0] == "chickadee"
    assert shown["overlay"] is None and shown["overlay_at"] is None

    publish(broker.port, "edgecam/cam-1/result", result("cam-1", 2, label="magpie", score=0.5))
    shown = wait_until(lambda: (d := dash.device("cam-1")) and d["result"]["seq"] == 2 and d, what="seq 2")
    assert shown["result"]["top"][0]["label"] == "magpie"
    assert [run[0] for run in shown["history"]] == ["chickadee", "magpie"]

    picture = jpeg()
    assert dash.get("/overlay/cam-1.jpg")[0] == 404  # none yet
    publish(broker.port, "edgecam/cam-1/overlay", picture)
    sent_at = time.time()
    shown = wait_until(lambda: (d := dash.device("cam-1"))["overlay"] == 1 and d, what="the overlay")
    assert abs(shown["overlay_at"] - sent_at) < 5 and shown["overlay_fresh"] is True
    status, headers, body = dash.get("/overlay/cam-1.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body == picture
    assert headers["content-length"] == str(len(picture))
    assert dash.get("/overlay/nope.jpg")[0] == 404
    assert dash.get("/overlay/cam-1.png")[0] == 404


# -- Server-Sent Events ----------------------------------------------------------------------


def test_events_start_with_a_snapshot_then_follow_devices(broker: Broker,
                                                          dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    seed(broker, dash, "cam-1", 1)
    first = Events(dash.port)
    try:
        assert first.resp.status == 200
        assert first.resp.getheader("Content-Type") == "text/event-stream"
        name, snap = first.next()
        assert name == "snapshot"
        assert [d["id"] for d in snap["devices"]] == ["cam-1"]
        assert snap["devices"][0]["result"]["seq"] == 1 and snap["devices"][0]["status"] == "online"
        assert snap["controls"] is False and snap["broker"] is True

        publish(broker.port, "edgecam/cam-1/result", result("cam-1", 2))
        name, dev = first.until(device_event("cam-1", 2))
        assert dev["status"] == "online" and dev["result"]["top"][0]["label"] == "chickadee"

        publish(broker.port, "edgecam/cam-2/status", b"degraded")
        _, dev2 = first.until(lambda n, d: n == "device" and d["id"] == "cam-2")
        assert dev2["status"] == "degraded" and dev2["result"] is None
    finally:
        first.close()

    # A browser that reconnects gets the state as it is now, at once.
    second = Events(dash.port)
    try:
        name, snap = second.next()
        assert name == "snapshot"
        assert [d["id"] for d in snap["devices"]] == ["cam-1", "cam-2"]
        assert snap["devices"][0]["result"]["seq"] == 2
    finally:
        second.close()


def test_two_browsers_both_get_every_update(broker: Broker, dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    seed(broker, dash, "cam-1", 1)
    a, b = Events(dash.port), Events(dash.port)
    try:
        assert a.next()[0] == "snapshot" and b.next()[0] == "snapshot"
        publish(broker.port, "edgecam/cam-1/result", result("cam-1", 5))
        a.until(device_event("cam-1", 5))
        b.until(device_event("cam-1", 5))
    finally:
        a.close()
        b.close()
    # Closed streams leave the server serving.
    assert dash.state()["devices"][0]["result"]["seq"] == 5


# -- bad data --------------------------------------------------------------------------------


def test_bad_data_on_the_broker_never_breaks_it(broker: Broker, dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    seed(broker, dash, "cam-1", 1)
    events = Events(dash.port)
    try:
        assert events.next()[0] == "snapshot"
        v2 = json.loads(result("cam-1", 2))
        v2["v"] = 2
        bad: list[tuple[str, bytes]] = [
            ("edgecam/cam-1/result", b"not json"),
            ("edgecam/cam-1/result", json.dumps([json.loads(result("cam-1", 3))]).encode()),
            ("edgecam/cam-1/result", json.dumps(v2).encode()),
            ("edgecam/cam-1/result", b"{" * 300_000),
            ("edgecam/cam-1/result", result("other", 4)),
            ("edgecam/bad id/result", result("bad id", 5)),
            ("edgecam/cam-1/status", b"exploded"),
            ("edgecam/cam-1/overlay", b"GIF89a not a jpeg"),
            ("edgecam/cam-1/stats", b"\x00\x01\x02"),
        ]
        for topic, payload in bad:
            publish(broker.port, topic, payload)
        wait_until(lambda: dash.state()["bad_messages"] >= len(bad), what=f"{len(bad)} bad messages counted")
        assert dash.proc.poll() is None, dash.log()
        state = dash.state()
        assert [d["id"] for d in state["devices"]] == ["cam-1"]
        cam1 = state["devices"][0]
        assert cam1["result"]["seq"] == 1 and cam1["status"] == "online" and cam1["overlay"] is None

        publish(broker.port, "edgecam/cam-1/result", result("cam-1", 6))
        # Nothing bad was broadcast: before the good result, at most the seed's own event (its
        # broadcast may trail the snapshot this stream began with).
        while (event := events.next()) and not device_event("cam-1", 6)(*event):
            name, dev = event
            assert (name, dev["id"], (dev["result"] or {}).get("seq")) == ("device", "cam-1", 1), event
        assert dash.device("cam-1")["result"]["seq"] == 6
    finally:
        events.close()
    assert "Traceback" not in dash.log()


def test_non_finite_numbers_on_the_broker_keep_the_state_json(broker: Broker,
                                                               dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    seed(broker, dash, "cam-1", 1)
    nan = result("cam-1", 2, label="magpie", score=0.5).replace(b'"score":0.5', b'"score":NaN')
    assert b"NaN" in nan
    publish(broker.port, "edgecam/cam-1/result", nan)
    publish(broker.port, "edgecam/cam-1/result", result("cam-1", 3, label="daisy"))
    # Whether the NaN result is dropped or taken, the next good one shows; then the state must be JSON.
    # (Taken, it stays for 10 minutes: the magpie run in the history keeps its NaN best score.)
    wait_until(lambda: dash.device("cam-1")["result"]["seq"] == 3, what="seq 3")

    def strict(text: str) -> Any:
        raise ValueError(f"{text} is not JSON")

    json.loads(dash.get("/api/state")[2], parse_constant=strict)
    events = Events(dash.port)
    try:
        line = b""
        while not line.startswith(b"data: "):
            line = events.resp.readline()
        json.loads(line[6:], parse_constant=strict)
    finally:
        events.close()


# -- token -----------------------------------------------------------------------------------


def test_token(broker: Broker, dashboard: Callable[..., Dashboard]) -> None:
    token = "s3cret-T0ken"
    dash = dashboard("--token", token, token=token)
    assert "open it with ?token=" in dash.log()
    for path in ("/", "/index.html", "/api/state", "/events", "/overlay/cam-1.jpg"):
        assert dash.get(path)[0] == 401, path
        assert dash.get(f"{path}?token=wrong")[0] == 401, path
        assert dash.get(path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        assert dash.get(path, headers={"Authorization": f"Basic {token}"})[0] == 401, path
    assert dash.get("/healthz")[0] == 200

    for path in ("/", "/api/state"):
        assert dash.get(f"{path}?token={token}")[0] == 200, path
        assert dash.get(path, headers={"Authorization": f"Bearer {token}"})[0] == 200, path
    for kw in ({"path": f"/events?token={token}"}, {"headers": {"Authorization": f"Bearer {token}"}}):
        events = Events(dash.port, **kw)
        try:
            assert events.resp.status == 200
            assert events.next()[0] == "snapshot"
        finally:
            events.close()

    status, body = dash.post_cmd(b'{"device": "cam-1", "cmd": {"cmd": "ping"}}')
    assert status == 401 and body["ok"] is False


def test_token_from_the_environment(broker: Broker, tmp_path: Path) -> None:
    # The environment variable keeps the token off the command line (and out of ps).
    port = free_port()
    log = tmp_path / "dash.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgecam", "dashboard", "--broker", broker.address, "--listen", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "EDGECAM_DASHBOARD_TOKEN": "envtok"},
        )
    try:
        def status(path: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            try:
                conn.request("GET", path)
                return conn.getresponse().status
            finally:
                conn.close()

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                return status("/healthz") == 200
            return False

        wait_until(up, what="GET /healthz")
        assert status("/api/state") == 401
        assert status("/api/state?token=envtok") == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()


# -- commands --------------------------------------------------------------------------------


def test_commands_need_a_broker_account(broker: Broker, dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    status, body = dash.post_cmd(json.dumps({"device": "cam-9", "cmd": {"cmd": "ping"}}).encode())
    assert status == 403 and body["ok"] is False and "authenticated" in body["error"]
    assert dash.request("POST", "/api/other", body=b"{}")[0] == 404


@pytest.mark.usefixtures("model_cache")
def test_commands_reach_a_real_daemon(broker: Broker, daemons, dashboard: Callable[..., Dashboard]) -> None:  # type: ignore[no-untyped-def]
    dash = dashboard("--username", "dash")
    assert dash.state()["controls"] is True
    d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", broker.address, "--device-id", "cam-9",
                env={"EDGECAM_COMMANDS_ENABLED": "on"})
    # Results through the dashboard: the daemon is connected, and subscribed to its commands.
    wait_until(lambda: (dash.device("cam-9") or {}).get("result"), timeout=90, what=f"cam-9 results: {d.log()}")
    assert dash.device("cam-9")["status"] == "online"

    status, reply = dash.post_cmd(json.dumps({"device": "cam-9", "cmd": {"cmd": "ping"}}).encode())
    assert status == 200, reply
    assert reply["ok"] is True and reply["device"] == "cam-9" and reply["id"].startswith("dash-")

    # The device's own answer to a bad command comes back as it is.
    status, reply = dash.post_cmd(json.dumps({"device": "cam-9", "cmd": {"cmd": "reboot"}}).encode())
    assert status == 200 and reply["ok"] is False and "unknown command" in reply["error"]

    for body in (b"not json", b"[1, 2]", b'{"device": "cam-9"}', b'{"cmd": {"cmd": "ping"}}',
                 b'{"device": "cam-9", "cmd": "ping"}', b'{"device": "bad id", "cmd": {"cmd": "ping"}}',
                 b'{"device": 9, "cmd": {"cmd": "ping"}}', b""):
        status, reply = dash.post_cmd(body)
        assert status == 400 and reply["ok"] is False and "expected" in reply["error"], body
    status, reply = dash.post_cmd(json.dumps({"device": "cam-9", "cmd": {"cmd": "ping"}, "pad": "x" * 5000}).encode())
    assert status == 413 and reply["ok"] is False

    start = time.monotonic()
    status, reply = dash.post_cmd(json.dumps({"device": "nobody-here", "cmd": {"cmd": "ping"}}).encode())
    waited = time.monotonic() - start
    assert status == 504 and reply["ok"] is False and "nobody-here" in reply["error"]
    assert waited >= 4.5  # the dashboard's 5 s wait for a reply (only a lower bound: no flake when slow)

    # The daemon still answers after all that.
    status, reply = dash.post_cmd(json.dumps({"device": "cam-9", "cmd": {"cmd": "ping"}}).encode())
    assert status == 200 and reply["ok"] is True
    assert d.proc.poll() is None and "Traceback" not in d.log()


@pytest.mark.parametrize("refusal", ["403 no account", "401 no token"])
def test_a_refused_command_leaves_the_connection_usable(broker: Broker, dashboard: Callable[..., Dashboard],
                                                        refusal: str) -> None:
    dash = dashboard("--token", "tok", token="tok") if refusal.startswith("401") else dashboard()
    query = "?token=tok" if refusal.startswith("403") else ""
    conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=WAIT)
    try:
        conn.request("POST", "/api/cmd" + query, body=json.dumps({"device": "cam-9", "cmd": {"cmd": "ping"}}),
                     headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.read()
        assert first.status == int(refusal[:3])
        if first.getheader("Connection", "").lower() == "close":
            return  # a server may close instead; then the browser opens a new connection
        conn.request("GET", "/healthz")  # the same connection, as a browser reuses it
        second = conn.getresponse()
        assert second.status == 200, (second.status, second.read()[:200])
    finally:
        conn.close()


def test_a_browser_that_falls_behind_is_cut_off_and_can_reconnect(broker: Broker,
                                                                  dashboard: Callable[..., Dashboard]) -> None:
    dash = dashboard()
    seed(broker, dash, "cam-1", 1)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(WAIT)
    slow.connect(("127.0.0.1", dash.port))
    slow.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = slow.recv(65536)
    assert b"200" in got.split(b"\r\n", 1)[0]
    # Big results (about 60 KB each, under the 64 KiB limit), far more than the socket buffers plus the
    # 256-event queue hold, while this browser reads nothing.
    base = json.loads(result("cam-1", 2))
    client = paho_client(broker.port)
    try:
        for seq in range(2, 602):
            base["seq"] = seq
            base["top"][0]["id"] = "x" * 60_000
            client.publish("edgecam/cam-1/result", json.dumps(base), qos=1).wait_for_publish(WAIT)
    finally:
        client.disconnect()
        client.loop_stop()
    wait_until(lambda: dash.device("cam-1")["result"]["seq"] == 601, what="all 600 results taken")

    def read_for(seconds: float, stop: Callable[[bytes], bool]) -> tuple[bytes, bool]:
        """What the stream sends in that time; and whether it ended."""
        deadline, tail = time.monotonic() + seconds, b""
        slow.settimeout(1)
        while time.monotonic() < deadline:
            try:
                chunk = slow.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                return tail, True
            tail = (tail + chunk)[-300_000:]
            if stop(tail):
                break
        return tail, False

    try:
        # The browser catches up with whatever the server kept for it.
        tail, ended = read_for(20, lambda t: b'"seq":601' in t)
        seqs = [int(s) for s in re.findall(rb'"seq":(\d+)', tail)]
        if not ended:
            # Still open: then it is still fed, and a new result reaches it.
            publish(broker.port, "edgecam/cam-1/result", result("cam-1", 1000))
            tail, ended = read_for(20, lambda t: b'"seq":1000' in t)
            assert ended or b'"seq":1000' in tail, (
                f"the stream stayed open after event seq {seqs[-1] if seqs else None} but carries no new "
                f"events: {tail[-80:]!r}"
            )
    finally:
        slow.close()
    # A reconnect gets the whole state.
    events = Events(dash.port)
    try:
        name, snap = events.next()
        assert name == "snapshot" and snap["devices"][0]["result"]["seq"] >= 601
    finally:
        events.close()


# -- set-up errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--listen", "nowhere"], ["--listen", "nowhere", "HOST:PORT"]),
        (["--listen", "127.0.0.1:99999"], ["--listen", "99999"]),
        (["--listen", "127.0.0.1:"], ["--listen"]),
        (["--listen", "a:b:c"], ["--listen", "'a:b:c'", "more than one ':'", "[::1]:PORT"]),
        (["--listen", ":8080"], ["--listen", "no host"]),
        (["--listen", "[::1]"], ["--listen", "no port"]),
        (["--listen", "127.0.0.1:\u00b3"], ["--listen", "port"]),
        (["--broker", "a:b:c"], ["--broker", "more than one ':'"]),
        (["--stale-after", "0"], ["--stale-after"]),
        (["--stale-after", "nan"], ["--stale-after"]),
        (["--prefix", "a/b"], ["--prefix"]),
        (["--broker", "localhost:0"], ["--broker"]),
    ],
)
def test_set_up_errors_are_one_line(args: list[str], needles: list[str]) -> None:
    proc = run_cli("dashboard", "--broker", "127.0.0.1:1", *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc, *needles)


def test_it_listens_on_an_ipv6_address(dashboard: Callable[..., Dashboard]) -> None:
    # [::1]:PORT: before, the IPv4-only server could not bind it ("cannot listen").
    dash = dashboard(host="::1")
    assert dash.get("/healthz")[0] == 200
    assert f"http://[::1]:{dash.port}/" in dash.log()


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("dashboard", "--broker", "127.0.0.1:1", "--listen", f"127.0.0.1:{port}", timeout=60)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc, "--listen", "cannot listen")


def test_a_new_device_is_shown_when_retired_ones_fill_the_table(broker: Broker,
                                                                dashboard: Callable[..., Dashboard]) -> None:
    """A fleet that has retired more devices than the table holds leaves their Last Will, a retained
    `offline`, on the broker: each dashboard start filled its table with them, and a new device was
    refused ("more than 256 devices") for as long as the dashboard ran."""
    from edgecam.web.fleet import MAX_DEVICES

    client = paho_client(broker.port)
    try:
        sent = [client.publish(f"edgecam/old-{i:03d}/status", b"offline", qos=1, retain=True)
                for i in range(MAX_DEVICES + 10)]
        for info in sent:
            info.wait_for_publish(WAIT)
        dash = dashboard()
        wait_until(lambda: len(dash.state()["devices"]) == MAX_DEVICES, what="the retired devices")
        client.publish("edgecam/new-cam/status", b"online", qos=1).wait_for_publish(WAIT)
        client.publish("edgecam/new-cam/result", result("new-cam", 1), qos=1).wait_for_publish(WAIT)
        shown = wait_until(lambda: dash.device("new-cam"), what="the new device on the dashboard")
        assert shown["status"] == "online" and shown["result"]["seq"] == 1
        assert len(dash.state()["devices"]) == MAX_DEVICES
    finally:
        client.loop_stop()
        client.disconnect()
