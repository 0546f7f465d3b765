"""Home Assistant MQTT discovery: retained config messages for one device. Pure.

Follows Home Assistant's MQTT discovery documentation (home-assistant.io/integrations/mqtt,
sensor.mqtt and image.mqtt, as published in 2025-2026): topics
<discovery_prefix>/<component>/<node_id>/<object_id>/config, a shared "device" block,
and availability wired to edgecam's retained status topic.
"""

from __future__ import annotations

import json
from typing import Any

from edgecam import __version__
from edgecam.contract import OVERLAY, RESULT, STATS, STATUS, check_device_id, topic


def node_id(device: str) -> str:
    """The discovery node id of a device: node ids take [a-zA-Z0-9_-], device ids also '.'.

    Doubling '_' and writing '.' as '_d' keeps distinct devices distinct (cam_1, cam.1 and cam-1
    stay three). Only a device id passes: anything else would make topics Home Assistant ignores.
    """
    check_device_id(device)
    return "edgecam_" + device.replace("_", "__").replace(".", "_d")


def configs(prefix: str, device: str, model: str, ha_prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery message for this device."""
    node = node_id(device)
    common: dict[str, Any] = {
        "availability_topic": topic(prefix, device, STATUS),
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": {
            "identifiers": [node],
            "name": f"edgecam {device}",
            "manufacturer": "edgecam",
            "model": model,
            "sw_version": __version__,
        },
        "origin": {"name": "edgecam", "sw_version": __version__},
    }
    entities: list[tuple[str, str, dict[str, Any]]] = [
        (
            "sensor",
            "top1",
            {
                "name": "Top label",
                "state_topic": topic(prefix, device, RESULT),
                "value_template": "{{ value_json.top[0].label }}",
                "json_attributes_topic": topic(prefix, device, RESULT),
                "json_attributes_template": (
                    "{{ {'score': value_json.top[0].score, 'class_id': value_json.top[0].id, "
                    "'seq': value_json.seq, 'captured': value_json.ts} | tojson }}"
                ),
                "icon": "mdi:eye-outline",
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
            },
        ),
    ]
    out = []
    for component, obj, fields in entities:
        # default_entity_id replaced object_id in Home Assistant 2025.10 (object_id stops working in 2026.4).
        entity = f"{node}_{obj}".replace("-", "_").lower()
        payload = {**fields, **common, "unique_id": f"{node}_{obj}", "default_entity_id": f"{component}.{entity}"}
        config_topic = f"{ha_prefix}/{component}/{node}/{obj}/config"
        out.append((config_topic, json.dumps(payload, separators=(",", ":")).encode("utf-8")))
    return out
