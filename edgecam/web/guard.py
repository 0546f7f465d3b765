"""What the dashboard checks in a request before it acts on it. Pure: no I/O.

The dashboard is reached by browsers that also have other sites open. A page elsewhere can make
the browser send requests here (cross-site requests), and a name the attacker controls can be
pointed at this address after the page loaded (DNS rebinding), so the browser treats this
dashboard as the attacker's own site and lets the page read it. Both carry tell-tale headers:
Origin names the page that sent the request, Host the name the browser thinks it is talking to.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from email.message import Message
from urllib.parse import unquote_plus, urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class Refusal(Exception):
    """A request refused before it is acted on: an HTTP status and one line saying why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def host_name(value: str) -> str:
    """The host part of a Host header or netloc, lower case, without port, brackets or a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    name = value.rpartition(":")[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_names(listen_host: str, extra: Iterable[str]) -> frozenset[str]:
    """The names this dashboard answers to: loopback names, the listen address, and the operator's own."""
    return frozenset({*LOOPBACK_NAMES, host_name(listen_host), *(host_name(n) for n in extra)}) - {""}


def check_host(host: str | None, names: frozenset[str]) -> None:
    """Refuses a Host naming anything but this dashboard.

    An address (not a name) is accepted: rebinding needs a name the attacker controls, and a
    page loaded from an address has that address as its origin, so it is this dashboard's own."""
    if host is None:
        return  # not a browser (they always send one); nothing to rebind
    name = host_name(host)
    if name in names or is_ip(name):
        return
    shown = host.strip()[:80]
    raise Refusal(403, f"Host {shown!r} is not a name of this dashboard (allow it with --allow-host {name[:80]})")


def check_origin(origin: str | None, fetch_site: str | None, host: str | None, allowed: frozenset[str]) -> None:
    """Refuses a state-changing request sent by a page of another site.

    A browser sends Origin with every POST; the dashboard's own page has the origin it was
    loaded from, which is what Host says, or one of the names the operator allowed (`allowed`:
    behind a proxy that rewrites Host). Loopback names and addresses are not enough here: another
    local web app, or a page served from any address, is another site. No Origin: not a browser
    (curl, a script)."""
    if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
        raise Refusal(403, "a command from another site's page (Sec-Fetch-Site: cross-site) is refused")
    if origin is None:
        return
    parts = urlsplit(origin.strip())
    netloc = parts.netloc.lower()
    if parts.scheme in ("http", "https") and netloc:
        if host is not None and netloc == host.strip().lower():
            return
        if host_name(netloc) in allowed:
            return
    raise Refusal(403, f"a command from the page at {origin.strip()[:80]!r} is refused: not this dashboard's origin")


def check_json(content_type: str | None) -> None:
    """Commands are JSON. A page elsewhere can send text/plain or a form without asking, but not JSON."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media != "application/json":
        shown = (content_type or "none")[:60]
        raise Refusal(415, f"Content-Type {shown!r}: commands must be sent as application/json")


def body_length(headers: Message, limit: int) -> int:
    """The body's length from Content-Length, checked before a byte of it is read."""
    values = headers.get_all("Content-Length") or []
    if headers.get("Transfer-Encoding"):
        raise Refusal(411, "a body sent in chunks is not taken: send it with a Content-Length")
    if not values:
        raise Refusal(411, "Content-Length is needed")
    texts = {v.strip() for v in values}
    if len(texts) != 1:
        raise Refusal(400, "more than one Content-Length")
    text = texts.pop()
    if not (text.isascii() and text.isdigit()):
        raise Refusal(400, f"Content-Length {text[:20]!r} is not a number of bytes")
    # Compared as text first: a number with thousands of digits is not worth converting.
    if len(text.lstrip("0")) > len(str(limit)) or int(text) > limit:
        raise Refusal(413, f"a body of {text[:20]} bytes is over the {limit}-byte limit")
    return int(text)


_QUERY_PAIR = re.compile(r"([?&;])([^=&;\s'\"]*)=([^&;\s'\"]*)")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(text: str, secret: str | None = None) -> str:
    """A log line with every token in it replaced: query parameters named token (however
    percent-encoded), bearer credentials, and the secret itself wherever it appears."""

    def pair(m: re.Match[str]) -> str:
        return f"{m[1]}{m[2]}=<redacted>" if unquote_plus(m[2]).strip().lower() == "token" else m[0]

    text = _BEARER.sub(r"\1<redacted>", _QUERY_PAIR.sub(pair, text))
    if secret:
        text = text.replace(secret, "<redacted>")
    return text
