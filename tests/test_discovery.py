"""Home Assistant MQTT discovery from a real daemon through a real Mosquitto.

The configs follow Home Assistant's MQTT discovery (sensor.mqtt, image.mqtt): retained, one per
entity under homeassistant/<component>/<node_id>/<object_id>/config, sent again when Home
Assistant's birth message ("online" on homeassistant/status) arrives.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from broker import Broker, Recorder, publish
from conftest import IMAGES

from edgecam import __version__

try:
    import jinja2
    import jinja2.sandbox
except ImportError:  # not a dependency of edgecam: the rendering checks are skipped without it
    jinja2 = None  # type: ignore[assignment]

pytestmark = pytest.mark.usefixtures("model_cache")

DEVICE = "kitchen-cam"
NODE = "edgecam_kitchen-cam"
MODEL = "tf2_mobilenet_v2_1.0_224_ptq"
TOP1 = f"homeassistant/sensor/{NODE}/top1/config"
FPS = f"homeassistant/sensor/{NODE}/fps/config"
OVERLAY = f"homeassistant/image/{NODE}/overlay/config"
TOPICS = {TOP1, FPS, OVERLAY}
DISCOVERY = {"EDGECAM_HOMEASSISTANT_DISCOVERY": "true"}


def configs(rec: Recorder) -> list[tuple[str, dict[str, Any], bool]]:
    return [(t, json.loads(p), r) for t, p, r in list(rec.messages) if t.endswith("/config")]


def count_configs(messages: list[tuple[str, bytes, bool]]) -> int:
    return sum(t.endswith("/config") for t, _, _ in messages)


def start(daemons, broker: Broker, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """A Recorder on homeassistant/# and the device's topics, then the daemon; after its first result."""
    rec = Recorder(broker.port, ["homeassistant/#", f"edgecam/{DEVICE}/#"])
    d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", broker.address, "--device-id", DEVICE,
                env=env)
    assert rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _ in m), 90), d.log()
    return d, rec


def test_discovery_configs(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker, DISCOVERY)
    assert rec.wait_for(lambda m: count_configs(m) >= 3, 30), d.log()
    found = {t: obj for t, obj, _ in configs(rec)}
    assert set(found) == TOPICS
    assert len(configs(rec)) == 3  # once on connect, not more

    assert len({obj["unique_id"] for obj in found.values()}) == 3
    device_blocks = [obj["device"] for obj in found.values()]
    assert all(block == device_blocks[0] for block in device_blocks)
    block = device_blocks[0]
    assert block["identifiers"] == [NODE]
    assert DEVICE in block["name"]
    assert block["manufacturer"] == "edgecam"
    assert block["model"] == MODEL
    assert block["sw_version"] == __version__
    for topic, obj in found.items():
        assert obj["availability_topic"] == f"edgecam/{DEVICE}/status", topic
        assert obj["payload_available"] == "online" and obj["payload_not_available"] == "offline", topic
        assert obj["unique_id"].startswith(NODE), topic
        assert obj["name"], topic

    top1 = found[TOP1]
    assert top1["state_topic"] == f"edgecam/{DEVICE}/result"
    assert top1["value_template"] == "{{ value_json.top[0].label }}"
    assert top1["json_attributes_topic"] == f"edgecam/{DEVICE}/result"

    fps = found[FPS]
    assert fps["state_topic"] == f"edgecam/{DEVICE}/stats"
    assert fps["value_template"] == "{{ value_json.fps }}"
    assert fps["unit_of_measurement"] == "fps"

    overlay = found[OVERLAY]
    assert overlay["image_topic"] == f"edgecam/{DEVICE}/overlay"
    assert overlay["content_type"] == "image/jpeg"
    assert "state_topic" not in overlay

    # The availability topic carries exactly those payloads.
    assert rec.on("status")[0] == b"online"

    # Retained: Home Assistant started later still finds them.
    late = Recorder(broker.port, "homeassistant/#")
    assert late.wait_for(lambda m: count_configs(m) >= 3, 15)
    assert {t for t, _, _ in configs(late)} == TOPICS
    assert all(retained for _, _, retained in configs(late))
    assert {t: obj for t, obj, _ in configs(late)} == found
    late.close()

    # Home Assistant's birth message (plain, not retained) asks for them again.
    publish(broker.port, "homeassistant/status", "online")
    assert rec.wait_for(lambda m: count_configs(m) >= 6, 30), d.log()
    again = configs(rec)[3:]
    assert {t for t, _, _ in again} == TOPICS
    assert {t: obj for t, obj, _ in again} == found
    assert "homeassistant: it came online" in d.log()

    # Anything else on that topic is not a birth message.
    publish(broker.port, "homeassistant/status", "offline")
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 3, 30)
    assert count_configs(rec.messages) == 6
    assert d.proc.poll() is None and "Traceback" not in d.log()
    rec.close()


@pytest.mark.skipif(jinja2 is None, reason="jinja2 is not installed (pip install jinja2): the discovery templates "
                    "are rendered as Home Assistant renders them only where it is importable")
def test_discovery_templates_render_real_messages(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker, {**DISCOVERY, "EDGECAM_LOOP_STATS_INTERVAL": "1"})
    assert rec.wait_for(lambda m: count_configs(m) >= 3 and any(t.endswith("/stats") for t, _, _ in m), 30), d.log()
    found = {t: obj for t, obj, _ in configs(rec)}
    result = rec.results()[-1]
    stats = json.loads(rec.on("stats")[-1])
    rec.close()

    # Home Assistant renders MQTT templates in a sandboxed Jinja2 environment with value_json set.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)

    def render(template: str, payload: dict[str, Any]) -> str:
        return env.from_string(template).render(value_json=payload, value=json.dumps(payload)).strip()

    top1 = found[TOP1]
    assert render(top1["value_template"], result) == result["top"][0]["label"]
    attributes = json.loads(render(top1["json_attributes_template"], result))
    assert attributes == {"score": result["top"][0]["score"], "class_id": result["top"][0]["id"],
                          "seq": result["seq"], "captured": result["ts"]}
    assert float(render(found[FPS]["value_template"], stats)) == pytest.approx(stats["fps"])


def test_no_discovery_by_default(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker)
    # Even Home Assistant's birth message gets nothing back.
    publish(broker.port, "homeassistant/status", "online")
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 4, 30), d.log()
    assert [t for t, _, _ in rec.messages if t.startswith("homeassistant/")] == ["homeassistant/status"]
    assert "homeassistant" not in d.log()
    rec.close()


def test_discovery_under_another_prefix(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    env = {**DISCOVERY, "EDGECAM_HOMEASSISTANT_PREFIX": "ha"}
    rec = Recorder(broker.port, ["ha/#", "homeassistant/#", "edgecam/dev.2/#"])
    d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", broker.address, "--device-id", "dev.2",
                env=env)
    assert rec.wait_for(lambda m: count_configs(m) >= 3, 90), d.log()
    assert {t for t, _, _ in configs(rec)} == {"ha/sensor/edgecam_dev_d2/top1/config",
                                               "ha/sensor/edgecam_dev_d2/fps/config",
                                               "ha/image/edgecam_dev_d2/overlay/config"}
    # The birth message is read under that prefix too.
    publish(broker.port, "homeassistant/status", "online")
    publish(broker.port, "ha/status", "online")
    assert rec.wait_for(lambda m: count_configs(m) >= 6, 30), d.log()
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 3, 30)
    rec.close()
    assert count_configs(rec.messages) == 6  # homeassistant/status is not this set-up's birth topic
    assert all(obj["availability_topic"] == "edgecam/dev.2/status" for _, obj, _ in configs(rec))


def test_distinct_devices_get_distinct_entities() -> None:
    from edgecam.device.discovery import configs as discovery_configs

    topics = [t for dev in ("cam-1", "cam_1", "cam.1") for t, _ in discovery_configs("edgecam", dev, MODEL)]
    ids = [json.loads(p)["unique_id"] for dev in ("cam-1", "cam_1", "cam.1")
           for _, p in discovery_configs("edgecam", dev, MODEL)]
    assert len(set(topics)) == len(topics) == 9
    assert len(set(ids)) == len(ids) == 9
