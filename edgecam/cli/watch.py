"""`edgecam watch`: what a field engineer runs over SSH to see that a device works.

Subscribes to results, status and stats, prints one readable line per result and, with
--heatmap, the decoded map as a block of text shades; and once per device and run, how its
previous run ended when not by a stop (the counted gap its stats report).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from typing import Any, TextIO

import numpy as np
import paho.mqtt.client as paho

from edgecam.broker import BrokerClient, options_from_flags
from edgecam.contract import (
    ANY_DEVICE,
    DEVICE_ID_RULE,
    RESULT,
    STATS,
    STATUS,
    PayloadError,
    check_device_id,
    check_prefix,
    check_previous,
    check_result,
    decode_cam,
    gap_text,
    is_device_id,
    parse_topic,
    topic,
)
from edgecam.core.cam import normalize
from edgecam.core.errors import EdgecamError, escaped
from edgecam.core.labels import short_label

log = logging.getLogger(__name__)

SHADES = " ░▒▓█"
MAX_PAYLOAD = 256 * 1024


def text_heatmap(cam: np.ndarray, shades: str = SHADES) -> list[str]:
    """Rows of shade characters, two per cell so the map keeps its shape in a terminal."""
    levels = np.clip((normalize(cam) * len(shades)).astype(int), 0, len(shades) - 1)
    return ["".join(shades[v] * 2 for v in row) for row in levels]


def result_line(obj: dict[str, Any]) -> str:
    top = " | ".join(f"{short_label(t['label'])} {t['score']:.2f}" for t in obj["top"])
    timing = obj.get("timing_ms") or {}
    latency = f"  {timing['total']:.1f} ms" if isinstance(timing.get("total"), int | float) else ""
    return f"{obj['device']} #{obj['seq']}  {top}{latency}"


# Exit statuses, as `watch --help` states them (EXIT_STATUSES): 2 is every command's for bad usage and
# for what will not mend by retrying (a refused login or certificate).
EXIT_TOO_FEW = 1
EXIT_NEVER_CONNECTED = 3
EXIT_STATUSES = f"""exit status:
  0  --count results arrived; or, without --count, --timeout ran out after connecting; or Ctrl-C
  {EXIT_TOO_FEW}  --timeout ran out before --count results arrived
  2  bad usage, or the broker refused the login or the TLS handshake
  {EXIT_NEVER_CONNECTED}  --timeout ran out without ever connecting to the broker"""


def run_watch(args: argparse.Namespace) -> int:
    # A negative or NaN timeout would make the wait return at once: exit 0 having watched nothing.
    if not args.timeout >= 0 or math.isinf(args.timeout):
        raise EdgecamError(f"--timeout {args.timeout:g}: must be a number of seconds, 0 (no limit) or more")
    if args.count < 0:
        raise EdgecamError(f"--count {args.count}: must be 0 (no limit) or more")
    opts = options_from_flags(args)
    prefix = check_prefix(args.prefix, "--prefix")
    device = check_device_id(args.device, "--device") if args.device else ANY_DEVICE
    results, status = topic(prefix, device, RESULT), topic(prefix, device, STATUS)
    stats = topic(prefix, device, STATS)
    done = threading.Event()
    seen = {"results": 0}
    gaps_told: set[tuple[str, str]] = set()  # (device, previous boot): every stats message repeats it
    rc = {"code": 0}

    def refused(line: str) -> None:
        # Run by hand: a refusal (login, certificate) will not mend by retrying, so say it and stop.
        say(f"edgecam: error: {line}", stream=sys.stderr)
        rc["code"] = 2
        done.set()

    def on_subscribe(_c: paho.Client, _u: Any, _mid: int, _reasons: Any, _p: Any) -> None:
        # Said once the broker confirmed: from here on, nothing published under the prefix is missed.
        say(f"watching {prefix}/{device}/ on {broker.where}", stream=sys.stderr)

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        dev, name = parse_topic(prefix, msg.topic) or ("?", "?")
        if not is_device_id(dev):
            say(f"{msg.topic}: not a device id ({DEVICE_ID_RULE})", stream=sys.stderr)
            return
        if name == STATUS:
            if not say(f"{dev} is {msg.payload[:20].decode('utf-8', 'replace')}"):
                done.set()
            return
        if name == STATS:
            try:
                if len(msg.payload) > MAX_PAYLOAD:
                    raise PayloadError(f"{len(msg.payload)} bytes, over {MAX_PAYLOAD}")
                obj = json.loads(msg.payload)
                previous = check_previous(obj.get("previous") if isinstance(obj, dict) else None)
            except (ValueError, PayloadError, RecursionError) as exc:
                say(f"{msg.topic}: bad stats: {str(exc)[:200]}", stream=sys.stderr)
                return
            gap = gap_text(previous)
            if gap and previous and (dev, previous["boot"]) not in gaps_told:
                gaps_told.add((dev, previous["boot"]))
                if not say(f"{dev}: {gap}"):
                    done.set()
            return
        try:
            if len(msg.payload) > MAX_PAYLOAD:
                raise PayloadError(f"{len(msg.payload)} bytes, over {MAX_PAYLOAD}")
            obj = check_result(json.loads(msg.payload))
            cam = decode_cam(obj["cam"]) if args.heatmap else None
        except (ValueError, PayloadError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            say(f"{msg.topic}: bad result: {str(exc)[:200]}", stream=sys.stderr)
            return
        lines = [result_line(obj)]
        if cam is not None:
            label = short_label(str(obj["cam"].get("label", "?")))
            lines.append(f"  CAM of {label}, {cam.shape[1]}x{cam.shape[0]}, {cam.min():.2f}..{cam.max():.2f}")
            lines += ["  " + row for row in text_heatmap(cam)]
        seen["results"] += 1
        if not say(*lines) or (args.count and seen["results"] >= args.count):
            done.set()

    ever_up = threading.Event()

    def on_up(c: paho.Client) -> None:
        ever_up.set()
        c.subscribe([(results, 1), (status, 1), (stats, 1)])

    broker = BrokerClient(opts, "watch", logger=log, on_refused=refused, on_up=on_up)
    broker.client.on_subscribe = on_subscribe
    broker.client.on_message = on_message
    broker.start()
    try:
        finished = done.wait(args.timeout if args.timeout else None)
    except KeyboardInterrupt:
        finished = True
    finally:
        broker.stop()
    if finished:
        return rc["code"]
    # --timeout ran out. Having watched nothing is not success: a script must tell a broker it never
    # reached from a quiet fleet.
    if not ever_up.is_set():
        print(f"edgecam: error: never connected to {broker.where} in {args.timeout:g} s", file=sys.stderr)
        return EXIT_NEVER_CONNECTED
    if args.count:
        got = seen["results"]
        print(f"edgecam: error: {got} results in {args.timeout:g} s, expected {args.count}", file=sys.stderr)
        return EXIT_TOO_FEW
    return 0


def say(*lines: str, stream: TextIO | None = None) -> bool:
    """Print lines holding what came from the network, escaped: a label must not move the cursor, retitle
    or clear the terminal, or start a line of its own (a newline in it is shown as \\x0a).

    False when the reader has gone (`edgecam watch | head`)."""
    stream = stream or sys.stdout
    try:
        stream.write("".join(escaped(line) + "\n" for line in lines))
        stream.flush()
    except BrokenPipeError:
        # Nothing more can be shown; keep the interpreter's last flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return False
    return True
