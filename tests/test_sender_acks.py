"""The sender deletes a spooled result only when the broker acknowledged that result.

paho numbers every publish (QoS 0 included) with a message id that wraps at 65535, and reports
every one of them to on_publish: overlays, stats, status and command replies as well as results.
A long-running device goes round the id space every hour or two, so an id seen before must
never count as the acknowledgement of a result published later under the same id.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from broker import Broker, Recorder
from conftest import wait_until

from edgecam.device.config import Config
from edgecam.device.mqtt import MqttSink
from edgecam.device.run import make_spool


def test_a_result_stays_spooled_until_its_own_ack_after_the_ids_wrap(broker: Broker, tmp_path: Path) -> None:
    cfg = Config()
    cfg.device_id = "dev-wrap"
    cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker.port
    cfg.spool.dir = str(tmp_path / "state")
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    rec = Recorder(broker.port, "edgecam/dev-wrap/result")
    sink.start()
    assert broker.proc is not None
    try:
        assert wait_until(lambda: sink.connected, 20)
        # One full turn of paho's message ids, spent on overlays (QoS 0, not spooled).
        for _ in range(65535):
            sink.overlay(b"\xff\xd8 not really a picture")
        assert wait_until(lambda: sink.counts["overlays"] == 65535, 60), sink.counts
        time.sleep(0.5)  # their on_publish reports reach the sender

        broker.proc.send_signal(signal.SIGSTOP)  # the connection stays up; nothing is acknowledged
        sink.result(b'{"seq": 1}')
        time.sleep(1.5)
        assert sink.spool.counts()["waiting"] == 1, "deleted from the spool without the broker's ack"
        assert sink.counts["acked"] == 0

        broker.proc.send_signal(signal.SIGCONT)
        assert rec.wait_for(lambda m: len(m) == 1, 20)
        assert wait_until(lambda: sink.spool.counts()["waiting"] == 0, 20)
        assert sink.counts["acked"] == 1
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        sink.close(2)
        rec.close()


def test_a_status_change_while_connecting_reaches_the_broker(broker: Broker, tmp_path: Path) -> None:
    """The source degrades between the connect's own status message and its acknowledgement: the
    retained status must end up degraded, not the online the connect sent."""
    cfg = Config()
    cfg.device_id = "dev-race"
    cfg.mqtt.host, cfg.mqtt.port = "127.0.0.1", broker.port
    cfg.spool.dir = str(tmp_path / "state")
    sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg))
    on_up = sink._on_up

    def up_then_degrade(client):  # type: ignore[no-untyped-def]
        on_up(client)  # publishes "online"; `connected` is set only when the broker acknowledges it
        sink.set_status("degraded")  # what the frame loop does at this moment, from its own thread

    sink.broker.on_up = up_then_degrade
    sink.start()
    try:
        assert wait_until(lambda: sink.connected, 20)
        rec = Recorder(broker.port, "edgecam/dev-race/status")
        try:
            # Retained, or live if it was sent again just after this subscription: degraded, last.
            assert rec.wait_for(lambda m: bool(m) and m[-1][1] == b"degraded", 20), rec.messages
        finally:
            rec.close()
    finally:
        sink.close(2)
