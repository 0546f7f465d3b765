"""Home Assistant MQTT discovery: retained config messages for one device. Pure.

Follows Home Assistant's MQTT discovery documentation (home-assistant.io/integrations/mqtt,
sensor.mqtt and image.mqtt, as published in 2025-2026): topics
<discovery_prefix>/<component>/<node_id>/<object_id>/config, a shared "device" block,
and availability wired to edgecam's retained status topic. Checked against a running
Home Assistant Core by bench/homeassistant_check.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgecam import __version__
from edgecam.contract import OVERLAY, RESULT, STATS, STATUS, check_device_id, topic

# Home Assistant refuses a sensor state longer than this and shows `unknown` instead.
MAX_STATE = 255

# The status topic carries online, degraded or offline; Home Assistant's availability knows only
# two payloads, so everything but online is rendered as offline (unavailable).
AVAILABILITY = "{{ 'online' if value == 'online' else 'offline' }}"

# ImageNet labels list synonyms ("hotdog, hot dog, red hot"): the first names the class and reads
# well in automations. A label with nothing before its first comma keeps the whole label.
STATE = (
    "{% set label = value_json.top[0].label %}"
    "{{ ((label.split(',')[0] | trim) or label)[:" + str(MAX_STATE) + "] }}"
)
ATTRIBUTES = (
    "{{ {'label': value_json.top[0].label, 'score': value_json.top[0].score, 'class_id': value_json.top[0].id, "
    "'top3': value_json.top[:3], 'seq': value_json.seq, 'captured': value_json.ts} | tojson }}"
)
# Percent: Home Assistant shows and graphs it with its unit, and thresholds read as in the UI ("above 80").
SCORE = "{{ (value_json.top[0].score * 100) | round(1) }}"


def node_id(device: str) -> str:
    """The discovery node id of a device: node ids take [a-zA-Z0-9_-], device ids also '.'.

    Doubling '_' and writing '.' as '_d' keeps distinct devices distinct (cam_1, cam.1 and cam-1
    stay three). Only a device id passes: anything else would make topics Home Assistant ignores.
    """
    check_device_id(device)
    return "edgecam_" + device.replace("_", "__").replace(".", "_d")


def entity_slug(node: str, obj: str) -> str:
    """The object part of the entity id, already in the form Home Assistant makes of it (lower case,
    runs of anything else as one '_'), so the id asked for is the id given."""
    return re.sub(r"[^a-z0-9]+", "_", f"{node}_{obj}".lower()).strip("_")


def configs(
    prefix: str, device: str, model: str, ha_prefix: str = "homeassistant", overlays: bool = True
) -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery message for this device. overlays: whether the device sends
    overlay pictures (loop.overlay_every > 0); without them the image entity's config is empty, which
    removes an image entity announced before."""
    node = node_id(device)
    common: dict[str, Any] = {
        "availability": [{"topic": topic(prefix, device, STATUS), "value_template": AVAILABILITY,
                          "payload_available": "online", "payload_not_available": "offline"}],
        "device": {
            "identifiers": [node],
            "name": f"edgecam {device}",
            "manufacturer": "edgecam",
            "model": model,
            "sw_version": __version__,
        },
        "origin": {"name": "edgecam", "sw_version": __version__},
    }
    entities: list[tuple[str, str, dict[str, Any] | None]] = [
        (
            "sensor",
            "top1",
            {
                "name": "Top label",
                "state_topic": topic(prefix, device, RESULT),
                "value_template": STATE,
                "json_attributes_topic": topic(prefix, device, RESULT),
                "json_attributes_template": ATTRIBUTES,
                "icon": "mdi:eye-outline",
            },
        ),
        (
            "sensor",
            "score",
            {
                "name": "Top score",
                "state_topic": topic(prefix, device, RESULT),
                "value_template": SCORE,
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                "icon": "mdi:percent-outline",
            },
        ),
        (
            "sensor",
            "fps",
            {
                "name": "Frames per second",
                "state_topic": topic(prefix, device, STATS),
                "value_template": "{{ value_json.fps }}",
                "unit_of_measurement": "fps",
                "state_class": "measurement",
                "entity_category": "diagnostic",
                "icon": "mdi:speedometer",
            },
        ),
        (
            "image",
            "overlay",
            {
                "name": "Class activation overlay",
                "image_topic": topic(prefix, device, OVERLAY),
                "content_type": "image/jpeg",
            } if overlays else None,
        ),
    ]
    out = []
    for component, obj, fields in entities:
        config_topic = f"{ha_prefix}/{component}/{node}/{obj}/config"
        if fields is None:
            out.append((config_topic, b""))
            continue
        # default_entity_id replaced object_id in Home Assistant 2025.10, which ignores object_id when
        # both are given (no deprecation warning); older versions drop default_entity_id as an unknown
        # key and use object_id. Both name the same id, so every version gives the same entity id.
        slug = entity_slug(node, obj)
        ids = {"unique_id": f"{node}_{obj}", "object_id": slug, "default_entity_id": f"{component}.{slug}"}
        payload = {**fields, **common, **ids}
        out.append((config_topic, json.dumps(payload, separators=(",", ":")).encode("utf-8")))
    return out
