"""The broker connection (paho-mqtt 2.x): contract v1 topics, retained status with a Last Will.

Topics, all under <prefix>/<device>/:
  result   JSON per published frame, QoS 1 by default
  overlay  raw JPEG bytes
  status   "online" / "offline", retained; "offline" is also the Last Will
  stats    JSON, retained
The daemon starts whether or not a broker is reachable; paho's network thread keeps
trying, with delays doubling from mqtt.reconnect_min to mqtt.reconnect_max.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .config import MqttConfig

log = logging.getLogger("edgecam")


class Sink(Protocol):
    """Where results go: a broker, or stdout when MQTT is off."""

    def start(self) -> None: ...
    def result(self, payload: bytes) -> None: ...
    def overlay(self, jpeg: bytes) -> None: ...
    def stats(self, payload: bytes) -> None: ...
    def close(self, timeout: float) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def counts(self) -> dict[str, int]: ...


def topic(prefix: str, device: str, name: str) -> str:
    return f"{prefix}/{device}/{name}"


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """TLS 1.2 or newer, host names checked, the system's CAs unless a CA file is given."""
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    return ctx


class MqttSink:
    def __init__(self, cfg: MqttConfig, device: str, password: str | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.where = f"{cfg.host}:{cfg.port}"
        self._topic = {n: topic(cfg.prefix, device, n) for n in ("result", "overlay", "status", "stats")}
        proto = paho.MQTTv5 if cfg.protocol == "5" else paho.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device, protocol=proto)
        self.client.will_set(self._topic["status"], "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(max(1, round(cfg.reconnect_min)), max(1, round(cfg.reconnect_max)))
        # paho keeps QoS 1 messages for an absent broker in memory; bound it.
        self.client.max_queued_messages_set(cfg.max_queued)
        if cfg.username:
            self.client.username_pw_set(cfg.username, password)
        if cfg.tls:
            self.client.tls_set_context(tls_context(cfg))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_publish = self._on_publish
        self._lock = threading.Lock()
        # QoS 1 message ids not yet acknowledged; an ack may beat publish() returning its id.
        self._pending: set[int] = set()
        self._early_acks: set[int] = set()
        self._connected = threading.Event()
        self._closing = False
        self.connected_at_close = False
        self._delay = 0.0
        self._last_stats: bytes | None = None
        self._since: float | None = None
        self._counts = {"published": 0, "overlays": 0, "dropped": 0, "connects": 0}

    # paho callbacks run on its network thread.
    def _next_delay(self) -> float:
        lo, hi = max(1, round(self.cfg.reconnect_min)), max(1, round(self.cfg.reconnect_max))
        self._delay = lo if not self._delay else min(self._delay * 2, hi)
        return self._delay

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt: %s refused the connection: %s; retrying in %g s", self.where, reason, self._next_delay())
            return
        self._counts["connects"] += 1
        gone = f" after {time.monotonic() - self._since:.0f} s away" if self._since is not None else ""
        log.info("mqtt: connected to %s as %s%s", self.where, self.device, gone)
        self._delay, self._since = 0.0, None
        client.publish(self._topic["status"], "online", qos=1, retain=True)
        if self._last_stats is not None:
            client.publish(self._topic["stats"], self._last_stats, qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if not self._closing and was:
            self._since = time.monotonic()
            log.warning("mqtt: lost the connection to %s (%s); reconnecting", self.where, reason)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
            else:
                self._early_acks.add(mid)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if self._since is None:
            self._since = time.monotonic()
        reason = _last_error()
        log.warning("mqtt: cannot reach %s%s; retrying in %g s", self.where, reason, self._next_delay())

    def start(self) -> None:
        log.info("mqtt: connecting to %s, topics under %s/%s/", self.where, self.cfg.prefix, self.device)
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def counts(self) -> dict[str, int]:
        return {**self._counts, "pending": self.pending()}

    def _publish(self, name: str, payload: bytes, qos: int, retain: bool = False) -> bool:
        info = self.client.publish(self._topic[name], payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS):
            self._counts["dropped"] += 1
            return False
        if qos > 0:
            with self._lock:
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                else:
                    self._pending.add(info.mid)
        return True

    def result(self, payload: bytes) -> None:
        if self._publish("result", payload, self.cfg.qos):
            self._counts["published"] += 1

    def overlay(self, jpeg: bytes) -> None:
        # Overlays are pictures of now: not worth queueing for a broker that is away.
        if self.connected and self._publish("overlay", jpeg, 0):
            self._counts["overlays"] += 1

    def stats(self, payload: bytes) -> None:
        self._last_stats = payload
        if self.connected:
            self._publish("stats", payload, 0, retain=True)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self, timeout: float) -> int:
        """Publish 'offline', wait up to `timeout` s for acknowledgements, disconnect.

        Returns how many QoS 1 messages the broker never acknowledged.
        """
        deadline = time.monotonic() + timeout
        if self.connected:
            if self._last_stats is not None:
                self._publish("stats", self._last_stats, 1, retain=True)
            self._publish("status", b"offline", 1, retain=True)
        # Waiting only makes sense on a live connection; paho does not resend before a reconnect.
        while self.pending() and self.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        left = self.pending()
        self.connected_at_close = self.connected
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()
        return left


class StdoutSink:
    """mqtt.enabled = false: results as JSON lines on stdout, for offline use and pipes."""

    def __init__(self) -> None:
        self._counts = {"published": 0, "overlays": 0, "dropped": 0}

    def start(self) -> None:
        log.info("mqtt: off; results go to stdout as JSON lines")

    @property
    def connected(self) -> bool:
        return True

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def result(self, payload: bytes) -> None:
        sys.stdout.write(payload.decode("utf-8") + "\n")
        sys.stdout.flush()
        self._counts["published"] += 1

    def overlay(self, jpeg: bytes) -> None:
        self._counts["overlays"] += 1

    def stats(self, payload: bytes) -> None:
        pass

    def close(self, timeout: float) -> int:
        return 0


def _last_error() -> str:
    exc = sys.exc_info()[1]
    if exc is None:
        return ""
    text = getattr(exc, "strerror", None) or " ".join(str(exc).split())
    return f" ({text})" if text else ""
