"""The broker connection (paho-mqtt 2.x): contract v1 topics, retained status with a Last Will,
and store-and-forward through the spool.

Topics, all under <prefix>/<device>/:
  result     JSON per published frame, QoS 1 by default, through the spool
  overlay    raw JPEG bytes (through the spool only when configured)
  status     "online" / "degraded" / "offline", retained; "offline" is also the Last Will
  stats      JSON, retained
  cmd        commands in (JSON), when enabled; replies on cmd/reply
The daemon starts whether or not a broker is reachable; paho's network thread keeps
trying, with delays doubling from mqtt.reconnect_min to mqtt.reconnect_max.

Results never wait in paho's memory: the frame loop appends them to the spool, and a
sender thread publishes the oldest first, with at most WINDOW unacknowledged at a
time, and deletes each when the broker acknowledges it. After a reconnect paho
resends the unacknowledged ones (oldest first) and the sender carries on after them;
after a restart it starts again from the oldest message in the spool.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from edgecam.broker import BrokerClient
from edgecam.contract import CMD, CMD_REPLY, OVERLAY, RESULT, STATS, STATUS, TOPIC_NAMES, topic
from edgecam.device.config import MqttConfig, broker_options
from edgecam.device.spool import Spool

log = logging.getLogger(__name__)

WINDOW = 16  # results in flight (published, not yet acknowledged)


class Sink(Protocol):
    """Where results go: a broker, or stdout when MQTT is off."""

    def start(self) -> None: ...
    def result(self, payload: bytes, seq: int = 0) -> None: ...
    def overlay(self, jpeg: bytes) -> None: ...
    def stats(self, payload: bytes) -> None: ...
    def set_status(self, status: str) -> None: ...
    def drain(self, timeout: float) -> None: ...
    def close(self, timeout: float) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def counts(self) -> dict[str, int]: ...
    @property
    def spool_counts(self) -> dict[str, int]: ...


class MqttSink:
    def __init__(
        self,
        cfg: MqttConfig,
        device: str,
        spool: Spool,
        password: str | None = None,
        spool_overlays: bool = False,
        on_command: Callable[[bytes], bytes | None] | None = None,
        discovery: list[tuple[str, bytes]] | None = None,
        ha_status_topic: str = "homeassistant/status",
    ) -> None:
        self.cfg = cfg
        self.device = device
        self.spool = spool
        self.spool_overlays = spool_overlays
        self.on_command = on_command
        self.discovery = discovery or []
        self.ha_status_topic = ha_status_topic
        self.topics = {n: topic(cfg.prefix, device, n) for n in TOPIC_NAMES}
        self.broker = BrokerClient(
            broker_options(cfg, device, password), "mqtt", logger=log,
            will=(self.topics[STATUS], "offline", 1, True), on_up=self._on_up, on_down=self._on_down,
        )
        self.where = self.broker.where
        self.client = self.broker.client
        # Only status, stats and replies go through paho's own queue; bound it all the same.
        self.client.max_queued_messages_set(WINDOW + 64)
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_unsubscribe = self._on_unsubscribe
        self._cond = threading.Condition()
        self._replies: list[paho.MQTTMessageInfo] = []  # replies perhaps not acknowledged yet
        self._unsubacks: set[int] = set()
        self._inflight: dict[int, int] = {}  # paho mid -> spool id
        # Every mid paho reports as sent or acknowledged, results or not: the sender keeps those
        # of its own in-flight results and ignores the rest (overlays, stats, replies, status).
        self._acked: list[int] = []
        self._cursor = 0  # highest spool id handed to paho
        self._fresh = True  # the spool may hold something after the cursor
        self._gate: int | None = None  # mid of the status message published on connect
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._sender: threading.Thread | None = None
        self.connected_at_close = False
        self._status = "online"
        self._gate_status = self._status  # the status the last connect published
        self._last_stats: bytes | None = None
        self._stats_told = False  # the broker acknowledged a stats message of this run
        self._stats_mids: set[int] = set()  # QoS 1 stats not yet acknowledged
        self._last_result: bytes | None = None  # given again to Home Assistant when it restarts
        self._state_owed = False  # Home Assistant asked while results were waiting in the spool
        self._last_overlay: bytes | None = None
        self._counts = {"published": 0, "acked": 0, "overlays": 0, "connects": 0}
        self._refused = 0

    # -- paho callbacks (its network thread) ---------------------------------------------
    def _on_up(self, client: paho.Client) -> None:
        self._counts["connects"] += 1
        # paho resends its unacknowledged messages right after this callback returns. The
        # sender waits for the broker's ack of this status message, which can only be read
        # after those resends went out, so new results never overtake older ones.
        with self._cond:
            self._gate_status = self._status
            self._gate = client.publish(self.topics[STATUS], self._gate_status, qos=1, retain=True).mid
        if self._last_stats is not None:
            self._stats_sent(client.publish(self.topics[STATS], self._last_stats, qos=1, retain=True).mid)
        if self.on_command is not None:
            client.subscribe(self.topics[CMD], qos=1)
        if self.discovery:
            self._announce(client)
            # Home Assistant forgets non-retained state when it restarts; its birth message asks again.
            client.subscribe(self.ha_status_topic, qos=1)

    def _on_down(self) -> None:
        self._connected.clear()
        with self._cond:
            self._cond.notify_all()  # a close waiting for the broker's acks waits no longer

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            # MQTT 5 says why (an ACL, a quota); 3.1.1 brokers drop such messages silently.
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                log.error("mqtt: %s refused a message: %s (%d so far; check the broker's ACL for %s/%s/#)",
                          self.where, reason, self._refused, self.cfg.prefix, self.device)
        if mid in self._stats_mids and not self._stats_told:
            self._stats_told = True
            self.spool.told()
        with self._cond:
            opened = mid == self._gate
            if opened:
                self._gate = None
                self._fresh = True
                self._connected.set()
            else:
                self._acked.append(mid)
            self._cond.notify_all()
        if opened and self._status != self._gate_status:
            # The status changed after the connect's own was sent and before `connected` was set,
            # when set_status could not publish it: without this the broker keeps the old one.
            client.publish(self.topics[STATUS], self._status, qos=1, retain=True)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_command is not None and msg.topic == self.topics[CMD]:
            # The callback answers at once only when it refuses; accepted commands are answered later.
            answer = self.on_command(bytes(msg.payload))
            if answer is not None:
                self.reply(answer)
        elif self.discovery and msg.topic == self.ha_status_topic and bytes(msg.payload).strip() == b"online":
            log.info("homeassistant: it came online; publishing discovery and the latest result again")
            self._announce(client)
            self._give_state(client)

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, *_: Any) -> None:
        with self._cond:
            self._unsubacks.add(mid)
            self._cond.notify_all()

    def _announce(self, client: paho.Client) -> None:
        for t, payload in self.discovery:
            client.publish(t, payload, qos=1, retain=True)

    def _give_state(self, client: paho.Client) -> None:
        # Results are not retained, so a restarted Home Assistant shows `unknown` until the next one
        # (with publish = "change", up to the heartbeat). Consumers drop the duplicate by boot and seq.
        # While results wait in the spool, the newest of them is still to come: sending it now would
        # let older ones overwrite it.
        # Then it is given once the spool has emptied (the sender's loop), not skipped: a spooled
        # message can still count as waiting for a moment after the broker acknowledged it.
        last = self._last_result
        if last is None:
            return
        if self.spool.counts()["waiting"]:
            self._state_owed = True
            with self._cond:
                self._cond.notify_all()
            return
        self._state_owed = False
        client.publish(self.topics[RESULT], last, qos=self.cfg.qos)
        if self._last_overlay is not None:
            client.publish(self.topics[OVERLAY], self._last_overlay, qos=0)

    def set_discovery(self, discovery: list[tuple[str, bytes]]) -> None:
        """New discovery messages (overlays turned on or off), published now when connected."""
        if discovery == self.discovery:
            return
        self.discovery = discovery
        if self.connected:
            self._announce(self.client)

    # -- the sender thread ---------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(self._has_work, timeout=1.0)
                acked, self._acked = self._acked, []
            self._settle(acked)
            if self._connected.is_set():
                self._send_more()
                if self._state_owed and not self.spool.counts()["waiting"]:
                    self._give_state(self.client)

    def _has_work(self) -> bool:
        if self._stop.is_set() or self._acked:
            return True
        return self._connected.is_set() and len(self._inflight) < WINDOW and self._fresh

    def _settle(self, acked: list[int]) -> None:
        done = []
        with self._cond:
            # A mid not in flight is another kind of message. It cannot be a result's ack
            # that beat its publish() returning: _inflight is filled on this same thread
            # before it reads _acked again. Keeping such mids "for later" would mark a result
            # delivered, unsent, once paho's ids wrap round at 65535.
            for mid in acked:
                sid = self._inflight.pop(mid, None)
                if sid is not None:
                    done.append(sid)
        if done:
            self.spool.delete(done)
            self._counts["acked"] += len(done)

    def _send_more(self) -> None:
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        batch = self.spool.after(self._cursor, room)
        with self._cond:
            self._fresh = len(batch) == room
        for msg in batch:
            if not self._connected.is_set():
                return
            info = self.client.publish(msg.topic, msg.payload, qos=msg.qos)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("mqtt: publish of message %d failed: %s", msg.id, paho.error_string(info.rc))
                return
            self._cursor = msg.id
            if msg.kind == "result":
                self._counts["published"] += 1
            if msg.qos == 0:
                self.spool.delete([msg.id])
                continue
            with self._cond:
                self._inflight[info.mid] = msg.id

    def _wake(self) -> None:
        with self._cond:
            self._fresh = True
            self._cond.notify_all()

    # -- the daemon's side ---------------------------------------------------------------
    def start(self) -> None:
        if self.spool.waiting_at_start:
            log.info("spool: %d messages from before are waiting in %s; they go first",
                     self.spool.waiting_at_start, self.spool.path)
        log.info("mqtt: connecting to %s, topics under %s/%s/", self.where, self.cfg.prefix, self.device)
        self._sender = threading.Thread(target=self._send_loop, name="edgecam-sender", daemon=True)
        self._sender.start()
        self.broker.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def counts(self) -> dict[str, int]:
        return {**self._counts, **self.spool_counts}

    @property
    def spool_counts(self) -> dict[str, int]:
        """stats.spool: what the spool counts, and the results sent but not yet acknowledged."""
        return {"inflight": len(self._inflight), **self.spool.counts()}

    def result(self, payload: bytes, seq: int = 0) -> None:
        self._last_result = payload
        self.spool.append("result", self.topics[RESULT], payload, self.cfg.qos, seq)
        self._wake()

    def overlay(self, jpeg: bytes) -> None:
        self._last_overlay = jpeg
        if self.spool_overlays:
            self.spool.append("overlay", self.topics[OVERLAY], jpeg, 1)
            self._wake()
            self._counts["overlays"] += 1
        elif self.connected:
            # A picture of now is not worth keeping for a broker that is away.
            info = self.client.publish(self.topics[OVERLAY], jpeg, qos=0)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._counts["overlays"] += 1

    def stats(self, payload: bytes) -> None:
        self._last_stats = payload
        if self.connected:
            # QoS 1 until the broker has acknowledged one: what the stats report about the runs before
            # this one (the spool's `told`) has then reached it.
            told = self._stats_told
            self._stats_sent(self.client.publish(self.topics[STATS], payload, qos=0 if told else 1, retain=True).mid)

    def _stats_sent(self, mid: int) -> None:
        # An ack that comes before its mid is added here is missed: the next stats go at QoS 1 again.
        if not self._stats_told:
            self._stats_mids.add(mid)

    def set_status(self, status: str) -> None:
        """online or degraded (the source is failing); retained, and sent again on every reconnect."""
        if status != self._status:
            self._status = status
            if self.connected:
                self.client.publish(self.topics[STATUS], status, qos=1, retain=True)

    def reply(self, payload: bytes) -> None:
        if self.connected:
            # paho calls on_publish holding its own lock: publish outside ours.
            info = self.client.publish(self.topics[CMD_REPLY], payload, qos=1)
            with self._cond:
                self._replies = [i for i in self._replies if not i.is_published()]
                self._replies.append(info)

    def _close_commands(self, deadline: float) -> None:
        """No more commands, and the replies to those received are delivered, before 'offline'.

        Once the broker acknowledges the unsubscribe it sends no more commands, and every command
        it sent before was read (and answered) first: paho reads the connection in order. A
        disconnect while replies are still being written cut them off (the broker saw a broken packet).
        """
        if self.on_command is None:
            return
        rc, mid = self.client.unsubscribe(self.topics[CMD])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            with self._cond:
                self._cond.wait_for(lambda: mid in self._unsubacks or not self.connected,
                                    max(0.0, deadline - time.monotonic()))
        with self._cond:
            replies = list(self._replies)
        for info in replies:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))

    def drain(self, timeout: float) -> None:
        """Deliver what the spool holds, up to `timeout` s."""
        deadline = time.monotonic() + timeout
        self._wake()
        # Also while (re)connecting: a broker that answers within the timeout still gets everything.
        while time.monotonic() < deadline and (self._inflight or self.spool.counts()["waiting"]):
            time.sleep(0.02)

    def close(self, timeout: float) -> int:
        """Publish the last stats and 'offline', disconnect. Returns how many messages stay in the spool."""
        deadline = time.monotonic() + timeout
        self.connected_at_close = self.connected
        if self.connected:
            self._close_commands(deadline)
            if self._last_stats is not None:
                self.client.publish(self.topics[STATS], self._last_stats, qos=1, retain=True)
            info = self.client.publish(self.topics[STATUS], "offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(max(0.5, deadline - time.monotonic()))
        self._stop.set()
        self._wake()
        if self._sender is not None:
            self._sender.join(5)
        self.broker.stop()
        left = self.spool.counts()["waiting"]
        self.spool.close()
        return left


class StdoutSink:
    """mqtt.enabled = false: results as JSON lines on stdout, for offline use and pipes."""

    def __init__(self) -> None:
        self._counts = {"published": 0, "overlays": 0}

    def start(self) -> None:
        log.info("mqtt: off; results go to stdout as JSON lines")

    @property
    def connected(self) -> bool:
        return True

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def spool_counts(self) -> dict[str, int]:
        return {}  # no spool: stdout takes every result at once

    def result(self, payload: bytes, seq: int = 0) -> None:
        sys.stdout.write(payload.decode("utf-8") + "\n")
        sys.stdout.flush()
        self._counts["published"] += 1

    def overlay(self, jpeg: bytes) -> None:
        self._counts["overlays"] += 1

    def stats(self, payload: bytes) -> None:
        pass

    def set_status(self, status: str) -> None:
        pass

    def drain(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> int:
        return 0
