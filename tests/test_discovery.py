"""Home Assistant MQTT discovery from a real daemon through a real Mosquitto.

The configs follow Home Assistant's MQTT discovery (sensor.mqtt, image.mqtt): retained, one per
entity under homeassistant/<component>/<node_id>/<object_id>/config, sent again when Home
Assistant's birth message ("online" on homeassistant/status) arrives.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, Recorder, publish
from conftest import IMAGES, MODELS

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
SCORE = f"homeassistant/sensor/{NODE}/score/config"
FPS = f"homeassistant/sensor/{NODE}/fps/config"
OVERLAY = f"homeassistant/image/{NODE}/overlay/config"
TOPICS = {TOP1, SCORE, FPS, OVERLAY}
DISCOVERY = {"EDGECAM_HOMEASSISTANT_DISCOVERY": "true"}
OVERLAYS = ("--overlay-every", "1")
NEEDS_JINJA = pytest.mark.skipif(
    jinja2 is None, reason="jinja2 is not installed (pip install jinja2): the discovery templates are rendered "
    "as Home Assistant renders them only where it is importable")


def configs(rec: Recorder) -> list[tuple[str, dict[str, Any], bool]]:
    return [(t, json.loads(p), r) for t, p, r in list(rec.messages) if t.endswith("/config") and p]


def count_configs(messages: list[tuple[str, bytes, bool]]) -> int:
    return sum(t.endswith("/config") for t, _, _ in messages)


def results_seen(messages: list[tuple[str, bytes, bool]]) -> int:
    return sum(t.endswith("/result") for t, _, _ in messages)


def start(daemons, broker: Broker, env: dict[str, str] | None = None, *args: str,  # type: ignore[no-untyped-def]
          source: Path = IMAGES):
    """A Recorder on homeassistant/# and the device's topics, then the daemon; after its first result."""
    rec = Recorder(broker.port, ["homeassistant/#", f"edgecam/{DEVICE}/#"])
    d = daemons("--source", source, "--source-fps", "2", "--broker", broker.address, "--device-id", DEVICE, *args,
                env=env)
    assert rec.wait_for(lambda m: results_seen(m) > 0, 90), d.log()
    return d, rec


def render(template: str, payload: bytes) -> str:
    """A template as Home Assistant renders it: sandboxed Jinja2, `value` the payload as text and `value_json`
    the payload parsed when it is JSON; the result stripped."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    variables: dict[str, Any] = {"value": payload.decode("utf-8")}
    with contextlib.suppress(ValueError):
        variables["value_json"] = json.loads(payload)
    return env.from_string(template).render(**variables).strip()


def available(config: dict[str, Any], status: bytes) -> bool | None:
    """Home Assistant's availability rule: the rendered status compared with the two payloads; anything
    else leaves availability as it was (None here)."""
    (entry,) = config["availability"]
    shown = render(entry["value_template"], status)
    return {entry["payload_available"]: True, entry["payload_not_available"]: False}.get(shown)


def test_discovery_configs(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker, DISCOVERY, *OVERLAYS)
    assert rec.wait_for(lambda m: count_configs(m) >= 4, 30), d.log()
    found = {t: obj for t, obj, _ in configs(rec)}
    assert set(found) == TOPICS
    assert len(configs(rec)) == 4  # once on connect, not more

    assert len({obj["unique_id"] for obj in found.values()}) == 4
    device_blocks = [obj["device"] for obj in found.values()]
    assert all(block == device_blocks[0] for block in device_blocks)
    block = device_blocks[0]
    assert block["identifiers"] == [NODE]
    assert DEVICE in block["name"]
    assert block["manufacturer"] == "edgecam"
    assert block["model"] == MODEL
    assert block["sw_version"] == __version__
    for topic, obj in found.items():
        (entry,) = obj["availability"]
        assert entry["topic"] == f"edgecam/{DEVICE}/status", topic
        assert "availability_topic" not in obj, topic  # Home Assistant takes one or the other
        assert obj["unique_id"].startswith(NODE), topic
        assert obj["name"], topic

    top1 = found[TOP1]
    assert top1["state_topic"] == f"edgecam/{DEVICE}/result"
    assert top1["json_attributes_topic"] == f"edgecam/{DEVICE}/result"
    assert "unit_of_measurement" not in top1 and "state_class" not in top1  # text, not a number

    score = found[SCORE]
    assert score["state_topic"] == f"edgecam/{DEVICE}/result"
    assert score["unit_of_measurement"] == "%" and score["state_class"] == "measurement"

    fps = found[FPS]
    assert fps["state_topic"] == f"edgecam/{DEVICE}/stats"
    assert fps["value_template"] == "{{ value_json.fps }}"
    assert fps["unit_of_measurement"] == "fps"

    overlay = found[OVERLAY]
    assert overlay["image_topic"] == f"edgecam/{DEVICE}/overlay"
    assert overlay["content_type"] == "image/jpeg"
    assert "state_topic" not in overlay

    # Retained: Home Assistant started later still finds them.
    late = Recorder(broker.port, "homeassistant/#")
    assert late.wait_for(lambda m: count_configs(m) >= 4, 15)
    assert {t for t, _, _ in configs(late)} == TOPICS
    assert all(retained for _, _, retained in configs(late))
    assert {t: obj for t, obj, _ in configs(late)} == found
    late.close()

    # Home Assistant's birth message (plain, not retained) asks for them again.
    publish(broker.port, "homeassistant/status", "online")
    assert rec.wait_for(lambda m: count_configs(m) >= 8, 30), d.log()
    again = configs(rec)[4:]
    assert {t for t, _, _ in again} == TOPICS
    assert {t: obj for t, obj, _ in again} == found
    assert "homeassistant: it came online" in d.log()

    # Anything else on that topic is not a birth message.
    publish(broker.port, "homeassistant/status", "offline")
    count = len(rec.results())
    assert rec.wait_for(lambda m: results_seen(m) >= count + 3, 30)
    assert count_configs(rec.messages) == 8
    assert d.proc.poll() is None and "Traceback" not in d.log()
    rec.close()


@NEEDS_JINJA
def test_discovery_templates_render_real_messages(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker, {**DISCOVERY, "EDGECAM_LOOP_STATS_INTERVAL": "1"})
    assert rec.wait_for(lambda m: count_configs(m) >= 4 and any(t.endswith("/stats") for t, _, _ in m)
                        and results_seen(m) >= 8, 60), d.log()
    found = {t: obj for t, obj, _ in configs(rec)}
    results = rec.on("result")
    stats = rec.on("stats")[-1]
    rec.close()

    # Every image of the set, its synonyms and all: the state is the first synonym, the full label an attribute.
    for payload in results:
        result = json.loads(payload)
        label = result["top"][0]["label"]
        assert render(found[TOP1]["value_template"], payload) == label.split(",")[0].strip()
        attributes = json.loads(render(found[TOP1]["json_attributes_template"], payload))
        assert attributes == {"label": label, "score": result["top"][0]["score"], "class_id": result["top"][0]["id"],
                              "top3": result["top"][:3], "seq": result["seq"], "captured": result["ts"]}
        assert len(attributes["top3"]) == 3
        score = render(found[SCORE]["value_template"], payload)
        assert float(score) == pytest.approx(result["top"][0]["score"] * 100, abs=0.05)
    labels = {json.loads(p)["top"][0]["label"] for p in results}
    assert "hotdog, hot dog, red hot" in labels  # the synonym case is among them
    assert float(render(found[FPS]["value_template"], stats)) == pytest.approx(json.loads(stats)["fps"])


@NEEDS_JINJA
def test_label_state_is_capped_for_home_assistant(broker: Broker, daemons, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A custom labels file may hold anything: Home Assistant shows `unknown` for a state over 255 characters.
    labels = (MODELS / "imagenet_labels.txt").read_text().splitlines()
    hotdog = labels.index("hotdog, hot dog, red hot")
    labels[hotdog] = "Sausage" * 60 + ", frankfurter"
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    folder = tmp_path / "hotdog"
    folder.mkdir()
    (folder / "hot_dog.jpg").write_bytes((IMAGES / "hot_dog.jpg").read_bytes())
    d, rec = start(daemons, broker, {**DISCOVERY, "EDGECAM_MODEL_LABELS": str(tmp_path / "labels.txt")},
                   source=folder)
    assert rec.wait_for(lambda m: count_configs(m) >= 4, 30), d.log()
    found = {t: obj for t, obj, _ in configs(rec)}
    payload = rec.on("result")[0]
    rec.close()
    assert json.loads(payload)["top"][0]["id"] == hotdog
    state = render(found[TOP1]["value_template"], payload)
    assert state == ("Sausage" * 60)[:255]
    assert json.loads(render(found[TOP1]["json_attributes_template"], payload))["label"] == labels[hotdog]


@NEEDS_JINJA
def test_degraded_is_unavailable_from_the_first_status(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder(broker.port, ["homeassistant/#", "edgecam/dev-gone/status"])
    d = daemons("--source", "/dev/video9", "--broker", broker.address, "--device-id", "dev-gone", env=DISCOVERY)
    assert rec.wait_for(lambda m: count_configs(m) >= 3 and bool(rec.on("status")), 60), d.log()
    config = configs(rec)[0][1]
    # The camera failed at start: no "online" first, for the read timeout, before "degraded".
    assert rec.on("status")[0] == b"degraded", rec.on("status")
    late = Recorder(broker.port, "edgecam/dev-gone/status")
    assert late.wait_for(lambda m: bool(m), 10)
    assert late.messages == [("edgecam/dev-gone/status", b"degraded", True)]
    late.close()
    assert available(config, b"degraded") is False
    assert available(config, b"online") is True
    assert available(config, b"offline") is False
    assert available(config, b"") is False

    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    assert rec.wait_for(lambda m: rec.on("status")[-1:] == [b"offline"], 10), rec.on("status")
    assert rec.on("status") == [b"degraded", b"offline"]
    rec.close()


def entity_id_old(component: str, config: dict[str, Any]) -> str:
    """Home Assistant before 2025.10: object_id, else the device's and the entity's names (has_entity_name);
    default_entity_id is an unknown key, dropped."""
    return f"{component}.{slug(config.get('object_id') or config['device']['name'] + ' ' + config['name'])}"


def entity_id_new(component: str, config: dict[str, Any]) -> str:
    """2025.10 and later: default_entity_id, else object_id (with a deprecation warning), else the names."""
    if "default_entity_id" in config:
        return f"{component}.{slug(config['default_entity_id'].partition('.')[2])}"
    return entity_id_old(component, config)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def test_entity_ids_are_the_same_on_old_and_new_home_assistant() -> None:
    from edgecam.device.discovery import configs as discovery_configs

    for device in ("kitchen-cam", "Cam.2", "yard_cam"):
        for topic, payload in discovery_configs("edgecam", device, MODEL):
            component = topic.split("/")[1]
            config = json.loads(payload)
            assert entity_id_old(component, config) == entity_id_new(component, config), (device, config)
            # The new versions warn about object_id only when default_entity_id is missing.
            assert "default_entity_id" in config
            assert config["default_entity_id"].startswith(component + ".")
    ids = [json.loads(p)["default_entity_id"] for _, p in discovery_configs("edgecam", "kitchen-cam", MODEL)]
    assert ids == ["sensor.edgecam_kitchen_cam_top1", "sensor.edgecam_kitchen_cam_score",
                   "sensor.edgecam_kitchen_cam_fps", "image.edgecam_kitchen_cam_overlay"]


def test_image_entity_only_while_overlays_are_on(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    # A retained image config from an earlier run with overlays on.
    publish(broker.port, OVERLAY, b'{"name": "old"}', retain=True)
    d, rec = start(daemons, broker, {**DISCOVERY, "EDGECAM_COMMANDS_ENABLED": "on"})

    def image_configs() -> list[bytes]:
        return [p for t, p, _ in list(rec.messages) if t == OVERLAY]

    # Overlays are off (the default) at start: the image config is emptied, which removes the entity.
    assert rec.wait_for(lambda m: image_configs()[1:] == [b""], 30), (image_configs(), d.log())

    def retained_image() -> list[bytes]:
        late = Recorder(broker.port, ["homeassistant/#", f"edgecam/{DEVICE}/stats"])
        # Retained messages come in one go on subscribing: once the sensors' and the stats are here, all are.
        assert late.wait_for(lambda m: count_configs(m) >= 3 and any(t.endswith("/stats") for t, _, _ in m), 30)
        late.close()
        return [p for t, p, _ in late.messages if t == OVERLAY]

    assert retained_image() == []

    cmd = f"edgecam/{DEVICE}/cmd"
    publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 2, "id": "on"}))
    assert rec.wait_for(lambda m: len(image_configs()) == 3 and bool(rec.on("overlay")), 30), d.log()
    image = json.loads(image_configs()[2])
    assert image["image_topic"] == f"edgecam/{DEVICE}/overlay"
    assert [json.loads(p) for p in retained_image()] == [image]

    publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 0, "id": "off"}))
    assert rec.wait_for(lambda m: image_configs()[3:] == [b""], 30), d.log()
    assert retained_image() == []
    # Another non-zero value after the first changes nothing Home Assistant sees.
    publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 3, "id": "on3"}))
    publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 5, "id": "on5"}))
    assert rec.wait_for(lambda m: sum(t.endswith("/cmd/reply") for t, _, _ in m) >= 4, 30), d.log()
    assert len(image_configs()) == 5 and image_configs()[4] == image_configs()[2]
    rec.close()


def test_home_assistant_restart_gets_the_current_state(broker: Broker, daemons, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One picture and publish = change: after the first result the next comes with the 30 s heartbeat.
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "cat.bmp").write_bytes((IMAGES / "cat.bmp").read_bytes())
    # Overlays through the spool: the first one is made before the connection is up and would be dropped.
    env = {**DISCOVERY, "EDGECAM_SPOOL_OVERLAYS": "true"}
    d, rec = start(daemons, broker, env, *OVERLAYS, "--publish", "change", source=folder)
    assert rec.wait_for(lambda m: bool(rec.on("overlay")), 30), d.log()
    first = rec.on("result")[0]
    overlays = len(rec.on("overlay"))

    publish(broker.port, "homeassistant/status", "online")
    assert rec.wait_for(lambda m: rec.on("result").count(first) >= 2, 15), d.log()
    assert rec.wait_for(lambda m: len(rec.on("overlay")) > overlays, 15), d.log()
    # Home Assistant's entities are there before the state: the configs come first.
    order = [t for t, _, _ in rec.messages]
    second = [i for i, t in enumerate(order) if t.endswith("/result")][1]
    assert count_configs([(t, b"", False) for t in order[:second]]) >= 8
    rec.close()


def test_no_discovery_by_default(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    d, rec = start(daemons, broker)
    # Even Home Assistant's birth message gets nothing back.
    publish(broker.port, "homeassistant/status", "online")
    count = len(rec.results())
    assert rec.wait_for(lambda m: results_seen(m) >= count + 4, 30), d.log()
    assert [t for t, _, _ in rec.messages if t.startswith("homeassistant/")] == ["homeassistant/status"]
    assert "homeassistant" not in d.log()
    rec.close()


def test_discovery_under_another_prefix(broker: Broker, daemons) -> None:  # type: ignore[no-untyped-def]
    env = {**DISCOVERY, "EDGECAM_HOMEASSISTANT_PREFIX": "ha"}
    rec = Recorder(broker.port, ["ha/#", "homeassistant/#", "edgecam/dev.2/#"])
    d = daemons("--source", IMAGES, "--source-fps", "2", "--broker", broker.address, "--device-id", "dev.2",
                env=env)
    assert rec.wait_for(lambda m: count_configs(m) >= 4, 90), d.log()
    # Overlays are off (the default): the image entity's config is the empty one that removes it.
    assert {t for t, _, _ in configs(rec)} == {"ha/sensor/edgecam_dev_d2/top1/config",
                                               "ha/sensor/edgecam_dev_d2/score/config",
                                               "ha/sensor/edgecam_dev_d2/fps/config"}
    assert ("ha/image/edgecam_dev_d2/overlay/config", b"", False) in rec.messages
    # The birth message is read under that prefix too.
    publish(broker.port, "homeassistant/status", "online")
    publish(broker.port, "ha/status", "online")
    assert rec.wait_for(lambda m: count_configs(m) >= 8, 30), d.log()
    count = len(rec.results())
    assert rec.wait_for(lambda m: results_seen(m) >= count + 3, 30)
    rec.close()
    assert count_configs(rec.messages) == 8  # homeassistant/status is not this set-up's birth topic
    assert all(obj["availability"][0]["topic"] == "edgecam/dev.2/status" for _, obj, _ in configs(rec))


def test_distinct_devices_get_distinct_entities() -> None:
    from edgecam.device.discovery import configs as discovery_configs

    devices = ("cam-1", "cam_1", "cam.1")
    topics = [t for dev in devices for t, _ in discovery_configs("edgecam", dev, MODEL)]
    ids = [json.loads(p)["unique_id"] for dev in devices for _, p in discovery_configs("edgecam", dev, MODEL)]
    assert len(set(topics)) == len(topics) == 12
    assert len(set(ids)) == len(ids) == 12
