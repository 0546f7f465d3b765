"""Talking to an MQTT broker: addresses, TLS."""

from __future__ import annotations

import ssl
from typing import Protocol

from edgecam.core.errors import EdgecamError


class TlsFiles(Protocol):
    """Where the TLS material is: the daemon's [mqtt] settings, or a command's flags."""

    ca_file: str
    cert_file: str
    key_file: str


def split_broker(text: str, default_port: int = 1883) -> tuple[str, int]:
    """HOST[:PORT] (and [v6]:PORT) to a host and a port, or EdgecamError."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise EdgecamError(f"--broker {text!r}: unclosed [")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise EdgecamError(f"--broker {text!r}: expected [HOST]:PORT")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    if not host:
        raise EdgecamError(f"--broker {text!r}: no host")
    return host, port


def _port(p: str, text: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise EdgecamError(f"--broker {text!r}: port {p!r} is not 1..65535")
    return int(p)


def tls_context(cfg: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2 or newer, host names checked, the system's CAs unless a CA file is given."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise EdgecamError(f"mqtt.ca_file: {cfg.ca_file}: not a usable CA certificate ({reason(exc)})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise EdgecamError(
                f"mqtt.cert_file/key_file: {cfg.cert_file}, {cfg.key_file}: not a usable certificate and key "
                f"({reason(exc)})"
            ) from None
    return ctx


def reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())
