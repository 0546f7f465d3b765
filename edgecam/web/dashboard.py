"""`edgecam dashboard`: a live web page for a fleet of devices, fed from the broker.

One MQTT subscription to <prefix>/+/{status,result,stats,overlay,cmd/reply}, the Fleet
state built from it, and a small HTTP server from the standard library: the page
(everything it needs is served from here, no CDN), Server-Sent Events for live updates
(a browser that connects or reconnects gets the whole state first), the latest overlay
per device, and, when the dashboard is authenticated to the broker, a command proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as paho

from edgecam.broker import BrokerClient, options_from_flags
from edgecam.contract import (
    ANY_DEVICE,
    CMD,
    CMD_REPLY,
    OVERLAY,
    RESULT,
    STATS,
    STATUS,
    check_prefix,
    is_device_id,
    topic,
)
from edgecam.core.errors import EdgecamError
from edgecam.web.fleet import Fleet

log = logging.getLogger("edgecam")

KEEPALIVE_S = 15.0
CLIENT_QUEUE = 256
COMMAND_TIMEOUT_S = 10.0  # a device applies commands between frames, maybe over a slow cellular link
MAX_BODY = 4096


class Hub:
    """The fleet state and the browsers listening to it. Thread-safe."""

    def __init__(self, prefix: str, stale_after: float, controls: bool) -> None:
        self.fleet = Fleet(prefix)
        self.stale_after = stale_after
        self.controls = controls
        self.lock = threading.Lock()
        self.clients: set[queue.Queue[str | None]] = set()
        self.replies: dict[str, dict[str, Any] | None] = {}  # only ids this dashboard is waiting for
        self.reply_cond = threading.Condition(self.lock)
        self.connected = False

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap = self.fleet.snapshot(time.time(), self.stale_after)
        snap["controls"] = self.controls
        snap["broker"] = self.connected
        return snap

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/cmd/reply"):
            self._reply(payload)
            return
        now = time.time()
        with self.lock:
            dev = self.fleet.ingest(topic, payload, now)
            if dev is None:
                return
            event = json.dumps(self.fleet.devices[dev].to_json(now, self.stale_after), separators=(",", ":"))
        self.broadcast(f"event: device\ndata: {event}\n\n")

    def _reply(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            with self.reply_cond:
                if obj["id"] in self.replies:
                    self.replies[obj["id"]] = obj
                    self.reply_cond.notify_all()

    def expect_reply(self, rid: str) -> None:
        with self.reply_cond:
            self.replies[rid] = None

    def wait_reply(self, rid: str, timeout: float) -> dict[str, Any] | None:
        with self.reply_cond:
            self.reply_cond.wait_for(lambda: self.replies.get(rid) is not None, timeout)
            return self.replies.pop(rid, None)

    def broadcast(self, message: str) -> None:
        with self.lock:
            clients = list(self.clients)
        for q in clients:
            try:
                q.put_nowait(message)
            except queue.Full:
                # A browser that cannot keep up is cut off; it reconnects and gets the whole state.
                self.drop(q)

    def add(self) -> queue.Queue[str | None]:
        q: queue.Queue[str | None] = queue.Queue(CLIENT_QUEUE)
        with self.lock:
            self.clients.add(q)
        return q

    def drop(self, q: queue.Queue[str | None]) -> None:
        with self.lock:
            self.clients.discard(q)
        # Make room for the end marker, or a full queue would keep the stream open, silent.
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        with contextlib.suppress(queue.Full):
            q.put_nowait(None)


def page() -> bytes:
    return resources.files("edgecam.web").joinpath("static/dashboard.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    hub: Hub
    token: str | None
    client: paho.Client
    prefix: str
    protocol_version = "HTTP/1.1"
    server_version = "edgecam-dashboard"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http: %s %s", self.address_string(), fmt % args)

    def _authorized(self) -> bool:
        if not self.token:
            return True
        query = parse_qs(urlsplit(self.path).query)
        given = (query.get("token") or [""])[0]
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
            return
        if path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
            return
        if not self._authorized():
            self._send(401, b"a token is needed: open the page as /?token=...\n", "text/plain")
            return
        if path in ("/", "/index.html"):
            self._send(200, page(), "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                        "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})
        elif path == "/api/state":
            self._json(200, self.hub.snapshot())
        elif path == "/events":
            self._events()
        elif path.startswith("/overlay/") and path.endswith(".jpg"):
            dev = path[len("/overlay/"):-4]
            with self.hub.lock:
                device = self.hub.fleet.devices.get(dev)
                data = device.overlay if device else None
            if data is None:
                self._send(404, b"no overlay\n", "text/plain")
            else:
                self._send(200, data, "image/jpeg")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _events(self) -> None:
        q = self.hub.add()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "keep-alive")
            self.end_headers()
            snap = json.dumps(self.hub.snapshot(), separators=(",", ":"))
            self.wfile.write(f"retry: 2000\nevent: snapshot\ndata: {snap}\n\n".encode())
            self.wfile.flush()
            while True:
                try:
                    msg = q.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    msg = ": keepalive\n\n"
                if msg is None:
                    return
                self.wfile.write(msg.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            self.hub.drop(q)
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the body stays unread; do not parse it as the next request
            self._json(413, {"ok": False, "error": f"over {MAX_BODY} bytes"})
            return
        raw = self.rfile.read(length) if length else b""
        if urlsplit(self.path).path != "/api/cmd":
            self._send(404, b"not found\n", "text/plain")
            return
        if not self._authorized():
            self._json(401, {"ok": False, "error": "a token is needed"})
            return
        if not self.hub.controls:
            self._json(403, {"ok": False, "error": "commands need a dashboard authenticated to the broker"})
            return
        try:
            body = json.loads(raw or b"{}")
            dev, cmd = body["device"], body["cmd"]
            if not is_device_id(dev) or not isinstance(cmd, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            self._json(400, {"ok": False, "error": 'expected {"device": ID, "cmd": {...}}'})
            return
        rid = "dash-" + secrets.token_hex(6)
        self.hub.expect_reply(rid)
        self.client.publish(topic(self.prefix, dev, CMD), json.dumps({**cmd, "id": rid}), qos=1)
        reply = self.hub.wait_reply(rid, COMMAND_TIMEOUT_S)
        if reply is None:
            self._json(504, {"ok": False, "error": f"no reply from {dev} in {COMMAND_TIMEOUT_S:g} s "
                                                   "(commands off on the device?)"})
        else:
            self._json(200, reply)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgecamError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_dashboard(args: argparse.Namespace) -> int:
    opts = options_from_flags(args, client_id=f"edgecam-dashboard-{secrets.token_hex(3)}")
    listen_host, listen_port = parse_listen(args.listen)
    if args.stale_after <= 0:
        raise EdgecamError(f"--stale-after {args.stale_after}: must be more than 0 seconds")
    check_prefix(args.prefix, "--prefix")
    token = args.token or os.environ.get("EDGECAM_DASHBOARD_TOKEN") or None
    if not is_loopback(listen_host) and not token:
        log.warning("dashboard: listening on %s with no --token: anyone who can reach it sees the fleet", listen_host)
    hub = Hub(args.prefix, args.stale_after, controls=bool(opts.username))
    topics = [(topic(args.prefix, ANY_DEVICE, k), 1) for k in (STATUS, RESULT, STATS, OVERLAY, CMD_REPLY)]

    def on_up(c: paho.Client) -> None:
        hub.connected = True
        c.subscribe(topics)
        log.info("dashboard: subscribed to %s/+/... on %s", args.prefix, broker.where)

    def on_down() -> None:
        hub.connected = False

    broker = BrokerClient(opts, "dashboard", logger=log, on_up=on_up, on_down=on_down)
    client = broker.client
    client.on_message = lambda _c, _u, msg: hub.on_message(msg.topic, bytes(msg.payload))

    handler = type("BoundHandler", (Handler,), {"hub": hub, "token": token, "client": client, "prefix": args.prefix})
    try:
        httpd = ThreadingHTTPServer((listen_host, listen_port), handler)
    except OSError as exc:
        raise EdgecamError(f"--listen {args.listen}: cannot listen ({exc.strerror or exc})") from None
    httpd.daemon_threads = True
    # SIGTERM (systemd, a test) stops the server the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    broker.start()
    note = " (open it with ?token=...)" if token else ""
    print(f"edgecam dashboard on http://{listen_host}:{listen_port}/{note} (broker {broker.where})",
          file=sys.stderr, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for q in list(hub.clients):
            hub.drop(q)
        httpd.server_close()
        broker.stop()
    return 0
