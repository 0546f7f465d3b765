"""`edgecam watch`: what a field engineer runs over SSH to see that a device works.

Subscribes to results and status, prints one readable line per result and, with
--heatmap, the decoded map as a block of text shades.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.broker import split_broker
from edgecam.contract import PayloadError, check_result, decode_cam
from edgecam.core.cam import normalize
from edgecam.core.errors import EdgecamError

SHADES = " ░▒▓█"
MAX_PAYLOAD = 256 * 1024


def text_heatmap(cam: np.ndarray, shades: str = SHADES) -> list[str]:
    """Rows of shade characters, two per cell so the map keeps its shape in a terminal."""
    levels = np.clip((normalize(cam) * len(shades)).astype(int), 0, len(shades) - 1)
    return ["".join(shades[v] * 2 for v in row) for row in levels]


def result_line(obj: dict[str, Any]) -> str:
    top = " | ".join(f"{t['label'].split(',')[0]} {t['score']:.2f}" for t in obj["top"])
    timing = obj.get("timing_ms") or {}
    latency = f"  {timing['total']:.1f} ms" if isinstance(timing.get("total"), int | float) else ""
    return f"{obj['device']} #{obj['seq']}  {top}{latency}"


def run_watch(args: argparse.Namespace) -> int:
    host, port = split_broker(args.broker)
    device = args.device or "+"
    for part, name in ((args.prefix, "--prefix"), (device, "--device")):
        if not part or "/" in part or "#" in part or ("+" in part and part != "+"):
            raise EdgecamError(f"{name} {part!r} cannot be an MQTT topic level")
    results = f"{args.prefix}/{device}/result"
    status = f"{args.prefix}/{device}/status"
    done = threading.Event()
    seen = {"results": 0}
    rc = {"code": 0}

    def on_connect(client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            print(f"edgecam: error: {host}:{port} refused the connection: {reason}", file=sys.stderr)
            rc["code"] = 2
            done.set()
            return
        client.subscribe([(results, 1), (status, 1)])

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _reasons: Any, _p: Any) -> None:
        # Said once the broker confirmed: from here on, nothing published under the prefix is missed.
        print(f"watching {args.prefix}/{device}/ on {host}:{port}", file=sys.stderr, flush=True)

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        dev = msg.topic.split("/")[-2]
        if msg.topic.endswith("/status"):
            print(f"{dev} is {msg.payload.decode('utf-8', 'replace')[:20]}", flush=True)
            return
        try:
            if len(msg.payload) > MAX_PAYLOAD:
                raise PayloadError(f"{len(msg.payload)} bytes, over {MAX_PAYLOAD}")
            obj = check_result(json.loads(msg.payload))
            cam = decode_cam(obj["cam"]) if args.heatmap else None
        except (ValueError, PayloadError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            print(f"{msg.topic}: bad result: {str(exc)[:200]}", file=sys.stderr, flush=True)
            return
        print(result_line(obj), flush=True)
        if cam is not None:
            label = str(obj["cam"].get("label", "?")).split(",")[0]
            print(f"  CAM of {label}, {cam.shape[1]}x{cam.shape[0]}, {cam.min():.2f}..{cam.max():.2f}")
            for row in text_heatmap(cam):
                print("  " + row)
            sys.stdout.flush()
        seen["results"] += 1
        if args.count and seen["results"] >= args.count:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_connect_fail = lambda *_: logging.getLogger("edgecam").warning(
        "watch: cannot reach %s:%d; retrying", host, port
    )
    client.reconnect_delay_set(1, 10)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        finished = done.wait(args.timeout if args.timeout else None)
    except KeyboardInterrupt:
        finished = True
    finally:
        client.disconnect()
        client.loop_stop()
    if not finished and args.count:
        got = seen["results"]
        print(f"edgecam: error: {got} results in {args.timeout:g} s, expected {args.count}", file=sys.stderr)
        return 1
    return rc["code"]
