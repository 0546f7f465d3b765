"""`edgecam dashboard`: a live web page for a fleet of devices, fed from the broker.

One MQTT subscription to <prefix>/+/{status,result,stats,overlay,cmd/reply}, the Fleet
state built from it, and a small HTTP server from the standard library: the page
(everything it needs is served from here, no CDN), Server-Sent Events for live updates
(a browser that connects or reconnects gets the whole state first), the latest overlay
per device, and, when the dashboard is authenticated to the broker, a command proxy.

Every request is checked (edgecam.web.guard) before anything is read past its headers: the
Host it names, for commands the page that sent it, the token, and the body's declared length.
Connections, event streams and the time a request may take are all bounded, so neither many
idle sockets nor a slow sender can tie the server up.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import paho.mqtt.client as paho

from edgecam.broker import BrokerClient, host_port, ip_version, join_host_port, options_from_flags, read_password
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
from edgecam.web.guard import (
    Refusal,
    allowed_names,
    body_length,
    check_host,
    check_json,
    check_origin,
    host_name,
    redact,
)

log = logging.getLogger(__name__)

KEEPALIVE_S = 15.0
STREAM_CHECK_S = 1.0  # how soon a stream notices its browser has gone
CLIENT_QUEUE = 256
COMMAND_TIMEOUT_S = 10.0  # a device applies commands between frames, maybe over a slow cellular link
MAX_BODY = 4096
MAX_REQUEST_BYTES = 64 * 1024  # request line, headers and body
DRAIN_S, DRAIN_BYTES = 1.0, 1 << 20  # what a refused client may still send before the connection closes
# A request (headers and body) must arrive within this, counted from when the server starts
# waiting for it; an idle kept-alive connection is closed after it too.
REQUEST_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 10.0  # a browser that takes no data for this long is gone
MAX_STREAMS = 32  # open pages; each holds one event stream and a thread
MAX_CONNECTIONS = 64  # in all, streams included; each is a thread


class Cap:
    """How many of something are in use, up to a limit. Refusals are logged once when they begin
    and once, with their count, when there is room again: a flood of them is two lines."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        self.used = 0
        self.refused = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.used < self.limit:
                self.used += 1
                return True
            self.refused += 1
            first = self.refused == 1
        if first:
            log.warning("dashboard: %d %s open, the most it serves; refusing more", self.limit, self.what)
        return False

    def give(self) -> None:
        with self.lock:
            self.used -= 1
            refused, self.refused = self.refused, 0
        if refused:
            log.warning("dashboard: refused %d %s while at the limit of %d", refused, self.what, self.limit)


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
        self.streams = Cap("event streams", MAX_STREAMS)

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


class RequestTooLarge(Exception):
    pass


class DeadlineReader(io.RawIOBase):
    """A socket read with a deadline and a size limit for the whole request, not only for each
    read: a sender that trickles a byte at a time still has to finish within the request timeout,
    and headers (http.server takes 100 lines of 64 KiB each) cannot fill the memory."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.start()

    def start(self) -> None:
        """A new request: its time and its bytes start now."""
        self.deadline = time.monotonic() + REQUEST_TIMEOUT_S
        self.left = MAX_REQUEST_BYTES

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        wait = self.deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError(f"the request did not arrive within {REQUEST_TIMEOUT_S:g} s")
        if self.left <= 0:
            raise RequestTooLarge
        self.sock.settimeout(wait)
        with memoryview(buf) as view:
            n = self.sock.recv_into(view[: self.left])
        self.left -= n
        return n


class Handler(BaseHTTPRequestHandler):
    hub: Hub
    token: str | None
    names: frozenset[str]  # Host names this dashboard answers to
    allowed: frozenset[str]  # the names of those the operator gave (--allow-host)
    client: paho.Client
    prefix: str
    protocol_version = "HTTP/1.1"
    server_version = "edgecam-dashboard"
    timeout = REQUEST_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.refused = False
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        self.reader.start()
        self.requestline, self.request_version, self.command = "", "HTTP/1.1", ""  # logged if it fails early
        try:
            super().handle_one_request()
        except RequestTooLarge:
            self._refuse(Refusal(431, f"the request's headers are over {MAX_REQUEST_BYTES // 1024} KiB"))

    def end_headers(self) -> None:
        # Reading is over; the answer gets its own time (the read deadline may be nearly spent).
        self.connection.settimeout(WRITE_TIMEOUT_S)
        super().end_headers()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("http: %s %s", self.address_string(), redact(fmt % args, self.token))

    def finish(self) -> None:
        super().finish()
        if self.refused:
            self._drain()

    def _drain(self) -> None:
        """Closing with unread data resets the connection, and the client may lose the answer with
        it; so what it still sends is taken, for a moment and up to a limit, and dropped."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            end, left = time.monotonic() + DRAIN_S, DRAIN_BYTES
            while left > 0 and (wait := end - time.monotonic()) > 0:
                self.connection.settimeout(wait)
                got = len(self.connection.recv(min(left, 1 << 16)))
                if not got:
                    break
                left -= got

    def _refuse(self, refusal: Refusal, as_json: bool = False) -> None:
        """One line saying why. A body the client may have sent stays unread: the connection
        is closed so that it is not parsed as the next request."""
        self.close_connection = True
        self.refused = True
        extra = {"Connection": "close"}
        if as_json:
            self._send(refusal.status, json.dumps({"ok": False, "error": refusal.reason}).encode(),
                       "application/json", extra)
        else:
            self._send(refusal.status, refusal.reason.encode() + b"\n", "text/plain; charset=utf-8", extra)

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
        # In pieces: the write timeout is then for a piece, and a slow link still gets a big overlay.
        for at in range(0, len(body), 1 << 16):
            self.wfile.write(body[at:at + (1 << 16)])

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:
        try:
            check_host(self.headers.get("Host"), self.names)
        except Refusal as refusal:
            self._refuse(refusal)
            return
        if self.headers.get("Content-Length") not in (None, "0") or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body on a GET is not read; it must not become the next request
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
                        "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                        # Framed in another site's page, the command form could be clicked through it.
                        "frame-ancestors 'none'",
                        "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})
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
        if not self.hub.streams.take():
            # EventSource gives up on a 503; the page tries again later by itself.
            self._refuse(Refusal(503, f"{MAX_STREAMS} pages are open, the most this dashboard serves; "
                                      "close one or try again later"))
            return
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
            quiet_since = time.monotonic()
            while True:
                try:
                    msg = q.get(timeout=STREAM_CHECK_S)
                except queue.Empty:
                    if self._hung_up():
                        return
                    if time.monotonic() - quiet_since < KEEPALIVE_S:
                        continue
                    msg = ": keepalive\n\n"
                if msg is None:
                    return
                self.wfile.write(msg.encode())
                self.wfile.flush()
                quiet_since = time.monotonic()
        except OSError:  # the browser went away mid-write, or stopped taking data
            pass
        finally:
            self.hub.drop(q)
            self.hub.streams.give()
            self.close_connection = True

    def _hung_up(self) -> bool:
        """Whether the browser closed its stream. It sends nothing after its request, so the
        socket turns readable only when it hangs up; a write would notice only much later, and
        until then the stream would count against MAX_STREAMS."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    def do_POST(self) -> None:
        # Everything that can refuse the request is checked on its headers, before its body is read.
        try:
            host = self.headers.get("Host")
            check_host(host, self.names)
            if urlsplit(self.path).path != "/api/cmd":
                raise Refusal(404, "not found")
            check_origin(self.headers.get("Origin"), self.headers.get("Sec-Fetch-Site"), host, self.allowed)
            if not self._authorized():
                raise Refusal(401, "a token is needed")
            if not self.hub.controls:
                raise Refusal(403, "commands need a dashboard authenticated to the broker")
            check_json(self.headers.get("Content-Type"))
            length = body_length(self.headers, MAX_BODY)
        except Refusal as refusal:
            self._refuse(refusal, as_json=True)
            return
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            return  # the client went away (or ran out of time) before sending what it announced
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


class Server(ThreadingHTTPServer):
    """One thread per connection, as many as MAX_CONNECTIONS; beyond that a connection is
    answered 503 at once and closed, without a thread."""

    daemon_threads = True
    request_queue_size = 128  # a burst of browsers (or an attack) waits in the kernel, briefly

    def __init__(self, address: tuple[str, int], handler: type[Handler]) -> None:
        self.connections = Cap("connections", MAX_CONNECTIONS)
        if ip_version(address[0]) == 6:
            self.address_family = socket.AF_INET6  # the class's AF_INET cannot bind [::1]
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.take():
            reason = b"too many connections to this dashboard; try again later\n"
            with contextlib.suppress(OSError):
                request.setblocking(False)  # never wait on this client from the accepting thread
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(reason), reason))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.give()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.give()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets or vanishes mid-request is not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("http: %s: %s", client_address[0] if client_address else "?", exc)
        else:
            log.exception("http: request from %s failed", client_address[0] if client_address else "?")


def dashboard_token(args: argparse.Namespace) -> str | None:
    """The token from --token-file, --token or $EDGECAM_DASHBOARD_TOKEN; a file or the environment
    keep it out of ps, which shows every user the command line."""
    if args.token and args.token_file:
        raise EdgecamError("--token and --token-file: give one of them")
    if args.token_file:
        token = read_password(args.token_file, "--token-file").strip()
        if not token or not token.isprintable() or " " in token:
            raise EdgecamError(f"--token-file: {args.token_file}: expected one line holding the token, "
                               "with no spaces")
        with contextlib.suppress(OSError):
            if os.stat(args.token_file).st_mode & 0o077:
                log.warning("dashboard: %s can be read by other users; chmod 600 it", args.token_file)
        return token
    if args.token:
        log.warning("dashboard: --token is visible to every user of this machine (ps); "
                    "use --token-file or $EDGECAM_DASHBOARD_TOKEN")
        return str(args.token)
    return os.environ.get("EDGECAM_DASHBOARD_TOKEN") or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_dashboard(args: argparse.Namespace) -> int:
    opts = options_from_flags(args, client_id=f"edgecam-dashboard-{secrets.token_hex(3)}")
    listen_host, listen_port = host_port(args.listen, "--listen")
    if not args.stale_after > 0:  # NaN too: no device would ever show stale
        raise EdgecamError(f"--stale-after {args.stale_after}: must be more than 0 seconds")
    check_prefix(args.prefix, "--prefix")
    token = dashboard_token(args)
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

    allowed = frozenset(host_name(n) for n in args.allow_host or ())
    handler = type("BoundHandler", (Handler,), {"hub": hub, "token": token, "client": client, "prefix": args.prefix,
                                                "names": allowed_names(listen_host, allowed), "allowed": allowed})
    try:
        httpd = Server((listen_host, listen_port), handler)
    except OSError as exc:
        raise EdgecamError(f"--listen {args.listen}: cannot listen ({exc.strerror or exc})") from None
    # SIGTERM (systemd, a test) stops the server the same way Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    broker.start()
    note = " (open it with ?token=...)" if token else ""
    print(f"edgecam dashboard on http://{join_host_port(listen_host, listen_port)}/{note} (broker {broker.where})",
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
