"""Talking to an MQTT broker: addresses, login, TLS, and the one paho client every part uses.

The daemon's sink, the dashboard and `edgecam watch` all connect through BrokerClient, built
from BrokerOptions: so each gets the same login, TLS (1.2 or newer, host names checked, client
certificates), reconnect backoff, and the same one-line reasons when a broker refuses or fails.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.core.errors import EdgecamError

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGECAM_MQTT_PASSWORD"
MAX_PASSWORD_FILE = 4096
KEEPALIVE_TIMEOUT = 141  # paho's reason code when nothing came back within the keepalive


class TlsFiles(Protocol):
    """Where the TLS material is: the daemon's [mqtt] settings, or a command's flags."""

    ca_file: str
    cert_file: str
    key_file: str


def host_port(text: str, flag: str, default_port: int | None = None) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT to a host and a port: the one rule for every address a flag takes
    (--broker, --listen). With a default port, the port may be left out: HOST, [IPv6], or a bare
    IPv6 address (whose colons cannot be told from a port's). EdgecamError, one line naming the
    flag, for anything else."""

    def bad(why: str) -> EdgecamError:
        return EdgecamError(f"{flag} {text!r}: {why}")

    port_text: str | None
    if "://" in text:
        raise bad("a URL; give the host and port alone, e.g. broker.lan:1883")
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed:
            raise bad("unclosed [")
        if rest and not rest.startswith(":"):
            raise bad("expected [HOST]:PORT")
        if host and ip_version(host) != 6:
            raise bad(f"{host!r} in brackets is not an IPv6 address")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        if ip_version(text) != 6:
            raise bad("more than one ':'; an IPv6 address goes in brackets: [::1]:PORT")
        if default_port is None:
            raise bad("no port; an IPv6 address goes in brackets, then its port: [::1]:PORT")
        host, port_text = text, None
    else:
        host, sep, port_text = text.partition(":")
        port_text = port_text if sep else None
    if not host:
        raise bad("no host")
    if (why := host_problem(host)) is not None:
        raise bad(why)
    if port_text is None:
        if default_port is None:
            raise bad("no port; expected HOST:PORT ([IPv6]:PORT for an IPv6 address)")
        return host, default_port
    # isascii: '³'.isdigit() holds but int() refuses it; five digits at most: int() of thousands of
    # digits raises rather than compare.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536):
        raise bad(f"port {port_text!r} is not 1..65535")
    return host, int(port_text)


def host_problem(host: str) -> str | None:
    """Why `host` cannot be a broker's or a listener's host, or None. A name is looked up as IDNA
    (socket.getaddrinfo encodes it so): a label over 63 characters, an empty one or a name over 253
    raised UnicodeError in paho's thread, a traceback and a client that never connected again."""
    if not host.isprintable() or " " in host:
        return "the host has a space or a control character"
    if ip_version(host) is not None:
        return None
    try:
        host.encode("idna")
    except UnicodeError as exc:
        return f"not a host name ({exc.__cause__ or exc})"
    return None


def join_host_port(host: str, port: int) -> str:
    """host_port's inverse: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ip_version(host: str) -> int | None:
    """4 or 6 for an IP address (an IPv6 one with its %zone too), None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def tls_context(cfg: TlsFiles, names: tuple[str, str] = ("mqtt.ca_file", "mqtt.cert_file/key_file")) -> ssl.SSLContext:
    """TLS 1.2 or newer, host names checked, the system's CAs unless a CA file is given.

    `names` are what the error lines call the CA file and the certificate pair (config keys or flags).
    """
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise EdgecamError(f"{names[0]}: {cfg.ca_file}: not a usable CA certificate ({reason(exc)})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise EdgecamError(
                f"{names[1]}: {cfg.cert_file}, {cfg.key_file}: not a usable certificate and key ({reason(exc)})"
            ) from None
    return ctx


def read_password(path: str, where: str) -> str:
    """A password file's text; its trailing line ending is not part of the password."""
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_PASSWORD_FILE + 1)  # /dev/zero or a log file given by mistake stays bounded
        if len(data) > MAX_PASSWORD_FILE:
            raise EdgecamError(f"{where}: {path}: over {MAX_PASSWORD_FILE} bytes, not a password file")
        return data.decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:80]
        raise EdgecamError(f"{where}: {path}: cannot read ({why})") from None


@dataclass(frozen=True)
class BrokerOptions:
    """How to reach and log in to a broker; built from the daemon's [mqtt] settings or a command's flags."""

    host: str = "localhost"
    port: int = 1883
    client_id: str = ""
    username: str = ""
    password: str | None = field(default=None, repr=False)  # never shown, not even in a repr
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    protocol: str = "3.1.1"
    keepalive: int = 30
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    # What error lines call the TLS files: config keys for the daemon, flags for the commands.
    tls_names: tuple[str, str] = ("mqtt.ca_file", "mqtt.cert_file/key_file")

    @property
    def where(self) -> str:
        return join_host_port(self.host, self.port)


def add_broker_flags(p: argparse.ArgumentParser, username_help: str = "broker user name") -> None:
    """--broker and the login and TLS flags, the same for every command that talks to a broker."""
    p.add_argument("--broker", "-b", default="localhost", metavar="HOST[:PORT]", help="default localhost:1883")
    p.add_argument("--username", help=username_help)
    p.add_argument("--password-file", help=f"file holding the broker password (or ${PASSWORD_ENV})")
    p.add_argument("--tls", action="store_true", help="connect with TLS (1.2 or newer, host name checked)")
    p.add_argument("--ca-file", help="CA certificate for TLS (default: the system's)")
    p.add_argument("--cert-file", help="client certificate for TLS")
    p.add_argument("--key-file", help="client key for TLS")


def options_from_flags(
    args: argparse.Namespace, client_id: str = "", environ: Mapping[str, str] | None = None, keepalive: int = 30
) -> BrokerOptions:
    """BrokerOptions from the flags add_broker_flags declared, checked, with one line for what is wrong."""
    environ = os.environ if environ is None else environ
    host, port = host_port(args.broker, "--broker", 1883)
    if bool(args.cert_file) != bool(args.key_file):
        raise EdgecamError("--cert-file and --key-file go together")
    if (args.ca_file or args.cert_file) and not args.tls:
        raise EdgecamError("--ca-file, --cert-file and --key-file need --tls")
    if args.password_file and not args.username:
        raise EdgecamError("--password-file needs --username")
    secret = read_password(args.password_file, "--password-file") if args.password_file else None
    return BrokerOptions(
        host=host, port=port, client_id=client_id, username=args.username or "",
        password=secret if secret is not None else (environ.get(PASSWORD_ENV) or None),
        tls=bool(args.tls), ca_file=args.ca_file or "", cert_file=args.cert_file or "",
        key_file=args.key_file or "", keepalive=keepalive, reconnect_min=1.0, reconnect_max=10.0,
        tls_names=("--ca-file", "--cert-file/--key-file"),
    )


class BrokerClient:
    """A paho client made from BrokerOptions, saying in one line why a connection failed or ended.

    The owner sets `client.on_message`, `on_publish`, `on_subscribe` as it needs, and gets
    `on_up(client)` on every accepted connection and `on_down()` whenever one ends or fails.
    `on_refused(line)`, when given, takes refusals and TLS failures instead of the log (a
    command run by hand exits on them; the daemon logs them and keeps retrying).
    """

    def __init__(
        self,
        opts: BrokerOptions,
        name: str,
        *,
        will: tuple[str, bytes | str, int, bool] | None = None,
        on_up: Callable[[paho.Client], None] | None = None,
        on_down: Callable[[], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.opts = opts
        self.name = name
        self.where = opts.where
        self.on_up = on_up
        self.on_down = on_down
        self.on_refused = on_refused
        self.log = logger or log
        self.connected = False
        self._closing = False
        self._refused = False
        self._delay = 0.0
        self._since: float | None = None  # when the broker was last lost (or first missed)
        # Built before the client, so a bad CA or key file is one line at start, not a dead network thread.
        context = tls_context(opts, opts.tls_names) if opts.tls else None
        proto = paho.MQTTv5 if opts.protocol == "5" else paho.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=proto)
        if will is not None:
            self.client.will_set(*will)
        self.client.reconnect_delay_set(*self._delays())
        if opts.username:
            self.client.username_pw_set(opts.username, opts.password)
        if context is not None:
            self.client.tls_set_context(context)
        # An exception in a callback would end paho's network thread, and with it all traffic.
        self.client.suppress_exceptions = True
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail

    def start(self) -> None:
        self.client.connect_async(self.opts.host, self.opts.port, keepalive=self.opts.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (its network thread) ---------------------------------------------
    def _delays(self) -> tuple[int, int]:
        return max(1, round(self.opts.reconnect_min)), max(1, round(self.opts.reconnect_max))

    def _next_delay(self) -> float:
        """The wait before paho's next try, as paho computes it: doubling from the first to the longest."""
        lo, hi = self._delays()
        self._delay = lo if not self._delay else min(self._delay * 2, hi)
        return self._delay

    def _failed(self, line: str, refusal: bool) -> None:
        if self._since is None:
            self._since = time.monotonic()
        if refusal and self.on_refused is not None:
            self.on_refused(line)
        else:
            self.log.error("%s: %s; retrying in %g s", self.name, line, self._next_delay())

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused = True
            self._failed(f"{self.where} refused the connection: {reason}", refusal=True)
            return
        gone = f" after {time.monotonic() - self._since:.0f} s away" if self._since is not None else ""
        who = f" as {self.opts.client_id}" if self.opts.client_id else ""
        self.log.info("%s: connected to %s%s%s", self.name, self.where, who, gone)
        self._delay, self._since = 0.0, None
        self.connected = True
        if self.on_up is not None:
            self.on_up(client)

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was, self.connected = self.connected, False
        refused, self._refused = self._refused, False
        if self.on_down is not None:
            self.on_down()
        if self._closing:
            return
        silent = reason == KEEPALIVE_TIMEOUT
        if was:
            self._since = time.monotonic()
            why = f"no answer within the keepalive, {self.opts.keepalive} s" if silent else str(reason)
            self.log.warning("%s: lost the connection to %s (%s); reconnecting", self.name, self.where, why)
        elif silent:
            # The connection opened and then nothing came back: a broker stopped without closing its
            # sockets (frozen, overloaded), or a network that drops packets.
            self._failed(f"no answer from {self.where} within the keepalive ({self.opts.keepalive} s) "
                         "after the connection opened", refusal=False)
        elif not refused:
            # Closed by the broker before it accepted us: with TLS 1.3 a missing or rejected client
            # certificate shows up only here, after the handshake seemed to succeed.
            self._failed(f"{self.where} closed the connection before accepting it "
                         f"({reason}; a client certificate it wants?)", refusal=self.opts.tls)

    def _on_connect_fail(self, _c: paho.Client, _u: Any) -> None:
        exc = sys.exc_info()[1]  # paho calls this from inside its except block
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            self._failed(f"TLS with {self.where} failed: {reason(exc)}", refusal=True)
            return
        if self._since is None:
            self._since = time.monotonic()
        if isinstance(exc, TimeoutError):
            # Say what was seen: the address takes connections (or drops packets) and nothing answers.
            step = "the TLS handshake" if self.opts.tls else "the connection"
            self.log.warning("%s: no answer from %s to %s within %g s; retrying in %g s", self.name, self.where,
                             step, self.client.connect_timeout, self._next_delay())
        else:
            why = f" ({reason(exc)})" if exc is not None else ""
            self.log.warning("%s: cannot reach %s%s; retrying in %g s", self.name, self.where, why,
                             self._next_delay())


def reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())
