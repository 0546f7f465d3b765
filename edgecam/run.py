"""`edgecam run` and `edgecam config check`: the effective configuration, and the daemon wired up."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import config
from .capture import Capture
from .config import Config
from .errors import EdgecamError

log = logging.getLogger("edgecam")

# flag attribute -> config key
FLAG_KEYS = {
    "source_fps": "source.fps",
    "device_id": "device_id",
    "prefix": "mqtt.prefix",
    "model": "model.name",
    "threads": "model.threads",
    "max_fps": "loop.max_fps",
    "publish": "loop.publish",
    "overlay_every": "loop.overlay_every",
}


def source_from_spec(cfg: Config, spec: str) -> None:
    """--source: a word, a directory, or what OpenCV opens."""
    if spec in ("auto", "picamera2"):
        cfg.source.kind, cfg.source.uri = spec, ""
    elif Path(spec).is_dir():
        cfg.source.kind, cfg.source.uri = "folder", spec
    else:
        cfg.source.kind, cfg.source.uri = "opencv", spec


def effective_config(args: argparse.Namespace) -> tuple[Config, str]:
    from .watch import split_broker

    cfg, origin = config.load(args.config)
    if args.source:
        source_from_spec(cfg, args.source)
    if args.once:
        cfg.source.repeat = False
    if args.broker:
        cfg.mqtt.host, cfg.mqtt.port = split_broker(args.broker, cfg.mqtt.port)
    if args.no_mqtt:
        cfg.mqtt.enabled = False
    for attr, key in FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            config.set_value(cfg, key, value, "--" + attr.replace("_", "-"))
    config.validate(cfg)
    return cfg, origin


def setup_logging(verbose: bool) -> None:
    # journald stamps each line itself; a terminal gets the time.
    fmt = "%(asctime)s %(levelname)s %(message)s" if sys.stderr.isatty() else "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    # paho logs through its own logger only when asked; keep third-party chatter out.
    logging.getLogger("edgecam").setLevel(logging.DEBUG if verbose else logging.INFO)


def run_daemon(args: argparse.Namespace) -> int:
    from .daemon import Daemon
    from .model import Classifier
    from .models import resolve
    from .mqtt import MqttSink, StdoutSink
    from .sources import open_source

    if args.max_frames < 0:
        raise EdgecamError(f"--max-frames {args.max_frames}: must be 0 (no limit) or more")
    cfg, origin = effective_config(args)
    setup_logging(args.verbose)
    local = resolve(cfg.model.name or None, cfg.model.labels or None)
    clf = Classifier(local.path, local.labels, num_threads=cfg.model.threads, name=local.name)
    src = cfg.source
    model_size = (clf.input.width, clf.input.height)
    display = (src.width, src.height) if cfg.loop.overlay_every else None
    source = open_source(src.kind, src.uri, model_size, display, (src.width, src.height), src.repeat, src.fps)
    capture = Capture(source, src.read_timeout)
    # Logged once set-up has worked, so a set-up error stays the only line.
    log.info("config: %s", origin)
    if cfg.mqtt.enabled:
        sink: MqttSink | StdoutSink = MqttSink(cfg.mqtt, cfg.device, config.password(cfg.mqtt))
    else:
        sink = StdoutSink()
    daemon = Daemon(cfg, clf, capture, sink, str(clf.runtime))
    daemon.install_signals()
    left = daemon.run(args.max_frames)
    if left:
        connected = getattr(sink, "connected_at_close", True)
        why = f"waited {cfg.mqtt.shutdown_timeout:g} s" if connected else "not connected at exit"
        log.error(
            "mqtt: %d messages were not acknowledged by %s:%d (%s); they are lost",
            left, cfg.mqtt.host, cfg.mqtt.port,
            why,
        )
        return 1
    if daemon.processed == 0 and capture.stats.state == "ended":
        log.error("source: %s: ended before any frame was used", capture.stats.reason or source.description)
        return 1
    log.info("stopped after %d frames, %d results published", daemon.processed, daemon.seq)
    return 0
