"""`edgecam run` and `edgecam config check`: the effective configuration, and the daemon wired up."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from edgecam.core.errors import EdgecamError
from edgecam.device import config, discovery
from edgecam.device.capture import Capture
from edgecam.device.config import Config
from edgecam.device.pipeline import StageFailed, interpreter_threads
from edgecam.device.sources import Source, SourceError, make_source, open_auto
from edgecam.device.spool import Quota, Spool, hold

log = logging.getLogger(__name__)

def setup_logging(verbose: bool) -> None:
    # journald stamps each line itself; a terminal gets the time.
    fmt = "%(asctime)s %(levelname)s %(message)s" if sys.stderr.isatty() else "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    # paho logs through its own logger only when asked; keep third-party chatter out.
    logging.getLogger("edgecam").setLevel(logging.DEBUG if verbose else logging.INFO)


def state_dir(cfg: Config) -> Path:
    """Where the spool lives: the config's, systemd's StateDirectory, /var/lib/edgecam, or the user's."""
    if cfg.spool.dir:
        return Path(cfg.spool.dir)
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    system = Path("/var/lib/edgecam")
    if system.is_dir() and os.access(system, os.W_OK):
        return system
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edgecam"


def make_spool(cfg: Config) -> Spool:
    mb = 1024 * 1024
    quotas = {
        "result": Quota(int(cfg.spool.max_mb * mb), cfg.spool.max_age_hours * 3600, cfg.spool.policy),
        "overlay": Quota(int(cfg.spool.overlay_mb * mb), cfg.spool.max_age_hours * 3600, cfg.spool.policy),
    }
    # One file per device id, so two daemons on one machine never share an outbox.
    path = state_dir(cfg) / f"spool-{cfg.device}.db" if cfg.spool.enabled else None
    if path is not None:
        hold(path)
    return Spool(path, quotas, cfg.mqtt.max_queued)


def commands_enabled(cfg: Config) -> bool:
    mode = cfg.commands.enabled
    return mode == "on" or (mode == "auto" and bool(cfg.mqtt.username))


def open_capture(cfg: Config, model_size: tuple[int, int]) -> Capture:
    """The source, opened. A camera or stream that cannot be opened now is not fatal:
    the capture thread keeps trying, and the daemon reports itself degraded meanwhile."""
    src = cfg.source
    display = (src.width, src.height) if cfg.loop.overlay_every else None

    def make() -> Source:
        return make_source(src.kind, src.uri, model_size, display, (src.width, src.height), src.repeat, src.fps,
                           src.max_pixels, src.read_timeout)

    if src.kind == "auto":
        return Capture(open_auto(model_size, display, (src.width, src.height), src.read_timeout), src.read_timeout)
    source = make()
    capture = Capture(source, src.read_timeout, renew=make if source.live else None)
    try:
        source.open()
    except SourceError as exc:
        if not source.live:
            raise EdgecamError(f"source: {exc}") from None
        log.error("source: %s; the daemon runs and keeps trying", exc)
        capture.needs_open = True
        capture.stats.state, capture.stats.reason = "degraded", str(exc)
    return capture


def run_daemon(args: argparse.Namespace) -> int:
    from edgecam.contract import gap_text
    from edgecam.core.manifest import resolve
    from edgecam.core.model import Classifier
    from edgecam.device.commands import Inbox
    from edgecam.device.daemon import Daemon
    from edgecam.device.mqtt import MqttSink, StdoutSink

    if args.max_frames < 0:
        raise EdgecamError(f"--max-frames {args.max_frames}: must be 0 (no limit) or more")
    cfg, origin = config.effective_config(args)
    setup_logging(args.verbose)
    local = resolve(cfg.model.name or None, cfg.model.labels or None)
    stated = config.stated_normalization(cfg.model) or local.normalization
    clf = Classifier(local.path, local.labels, num_threads=interpreter_threads(cfg.model.threads), name=local.name,
                     normalization=stated)
    for warning in clf.warnings:
        log.warning("model: %s", warning)
    inbox = Inbox(clf.labels, cfg.commands.rate)
    sink: MqttSink | StdoutSink
    overlays_changed: Callable[[bool], None] | None = None
    if cfg.mqtt.enabled:
        ha = cfg.homeassistant

        def ha_configs(overlays: bool) -> list[tuple[str, bytes]]:
            return discovery.configs(cfg.mqtt.prefix, cfg.device, clf.name, ha.prefix, overlays)

        announce = ha_configs(cfg.loop.overlay_every > 0) if ha.discovery else None
        mqtt_sink = MqttSink(cfg.mqtt, cfg.device, make_spool(cfg), config.password(cfg.mqtt), cfg.spool.overlays,
                             inbox.receive if commands_enabled(cfg) else None, announce, f"{ha.prefix}/status")
        sink = mqtt_sink
        if ha.discovery:
            # A command that turns overlays on or off adds or removes the image entity.
            def rediscover(on: bool) -> None:
                mqtt_sink.set_discovery(ha_configs(on))

            overlays_changed = rediscover
    else:
        sink = StdoutSink()
    capture = open_capture(cfg, (clf.input.width, clf.input.height))
    # Logged once set-up has worked, so a set-up error stays the only line.
    log.info("config: %s", origin)
    daemon = Daemon(cfg, clf, capture, sink, str(clf.runtime), inbox=inbox,
                    reply=sink.reply if isinstance(sink, MqttSink) else None,
                    reload_check=functools.partial(config.effective_config, args),
                    overlays_changed=overlays_changed)
    if isinstance(sink, MqttSink):
        previous = sink.spool.begin_run(daemon.boot)
        if previous is not None:
            daemon.previous = previous.to_json()
            gap = gap_text(daemon.previous)
            if gap:
                log.warning("spool: %s", gap)
    if isinstance(sink, MqttSink) and commands_enabled(cfg):
        log.info("commands: on, %s", sink.topics["cmd"])
    daemon.install_signals()
    try:
        left = daemon.run(args.max_frames)
    except StageFailed as exc:
        # `edgecam run --no-mqtt | head`: stdout's reader left; the CLI ends quietly as for any command.
        if isinstance(exc.__cause__, BrokenPipeError):
            raise exc.__cause__ from None
        raise
    if left:
        if isinstance(sink, MqttSink) and sink.spool.state == "file":
            log.info("mqtt: %d messages wait in %s for the broker; they go out after the next start",
                     left, sink.spool.path)
        else:
            connected = getattr(sink, "connected_at_close", True)
            why = f"waited {cfg.mqtt.shutdown_timeout:g} s" if connected else "not connected at exit"
            log.error("mqtt: %d messages were not acknowledged by %s:%d (%s), and no spool file holds them; "
                      "they are lost", left, cfg.mqtt.host, cfg.mqtt.port, why)
            return 1
    if daemon.reload.is_set():
        restart_in_place(daemon.reload)
    if daemon.processed == 0 and capture.stats.state == "ended":
        log.error("source: %s: ended before any frame was used", capture.stats.reason or capture.source.description)
        return 1
    log.info("stopped after %d frames, %d results made", daemon.processed, daemon.seq)
    return 0


def restart_in_place(reload: threading.Event) -> None:
    """SIGHUP: the same process (same PID, so systemd keeps tracking it) starts over with the new config."""
    # SIGHUP, SIGTERM and SIGINT stay blocked across the exec until the new process has its
    # handlers: a second reload right behind this one waits for it instead of killing the process
    # before it can catch it, and a stop is carried out by the new process instead of being lost.
    from edgecam.device.daemon import HELD_ACROSS_RELOAD

    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_ACROSS_RELOAD)
    if not reload.is_set():  # a stop came since: it clears the reload, and this process ends
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_ACROSS_RELOAD)
        return
    logging.shutdown()
    argv = [sys.executable, "-m", "edgecam", *sys.argv[1:]]
    os.execv(sys.executable, argv)
