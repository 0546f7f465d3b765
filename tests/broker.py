"""A real Mosquitto for tests: started on a free loopback port with a config the test writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if not found:
        raise RuntimeError("mosquitto is not installed: tests/run.sh installs the Debian package 'mosquitto'")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_conf: str = "",
        persist: bool = False,
        listener_conf: str = "",
        anonymous: bool = True,
    ) -> None:
        """persist: sessions and queued messages survive a restart of this broker (saved at stop).
        listener_conf: lines for the listener (TLS files); anonymous: whether clients may skip a password."""
        self.persist = persist
        self.listener_conf = listener_conf
        self.anonymous = anonymous
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "mosquitto.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{self.listener_conf}\n"
            f"allow_anonymous {'true' if self.anonymous else 'false'}\n"
            + (f"persistence true\npersistence_location {self.dir}/\n" if self.persist else "persistence false\n")
            # As root, mosquitto drops to its own user, which cannot write the test's directory.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"log_dest stderr\nlog_type error\nlog_type warning\n{self.extra}\n"
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.05)  # a TLS listener may need a moment after the port opens
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Recorder:
    """A subscriber that keeps every message, for assertions."""

    def __init__(
        self,
        port: int,
        topics: str | list[str],
        client_id: str = "",
        persistent: bool = False,
        ca: Path | None = None,
        auth: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        """persistent: a session the broker keeps (with its persistence on) while this client is away.
        ca, auth, cert: TLS with that CA, a user name and password, a client certificate and key."""
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retained
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.reconnect_delay_set(1, 1)
        subs = [topics] if isinstance(topics, str) else topics
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in subs])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        if ca is not None:
            certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
            self.client.tls_set(ca_certs=str(ca), certfile=certfile, keyfile=keyfile)
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not acknowledged")

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 30) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def on(self, suffix: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.messages if t.endswith("/" + suffix)]

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.on("result")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(
    port: int,
    topic: str,
    payload: bytes | str,
    retain: bool = False,
    ca: Path | None = None,
    auth: tuple[str, str] | None = None,
    host: str = "127.0.0.1",
) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    if ca is not None:
        client.tls_set(ca_certs=str(ca))
    if auth is not None:
        client.username_pw_set(*auth)
    client.connect(host, port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def paho_client(port: int) -> paho.Client:
    """A connected client with its network loop running."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client
