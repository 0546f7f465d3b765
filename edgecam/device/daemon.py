"""`edgecam run`: the frame loop. Frame -> preprocess -> invoke -> top-k -> CAM -> encode -> publish."""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from edgecam.contract import result_payload
from edgecam.core.errors import EdgecamError
from edgecam.core.explain import explain_inference
from edgecam.core.methods import make as make_method
from edgecam.core.model import Classifier, Inference
from edgecam.core.preprocess import Box, to_input
from edgecam.core.render import overlay, resize_picture
from edgecam.device.capture import Capture
from edgecam.device.clock import clock_synced
from edgecam.device.commands import CHECKS, MAX_CLASSES, Command, CommandError, Inbox, reply
from edgecam.device.config import Config
from edgecam.device.mqtt import Sink
from edgecam.device.notify import Notifier
from edgecam.device.pipeline import Prefetch, Stage
from edgecam.device.policy import EveryN, PublishPolicy
from edgecam.device.sources import Frame, SourceEnded
from edgecam.device.stats import StageTimes, cpu_temperature, stats_payload

log = logging.getLogger(__name__)

# The method behind every result's maps and the explain command's, chosen from the one registry.
# Only a method of cost "frame" fits the frame budget: the CAM comes from the prediction's own
# inference; occlusion (50 inferences) and the sampling methods (hundreds) would divide the frame
# rate by as much, so they are offline tools (`edgecam explain --method`). See docs/explain.md.
DAEMON_METHOD = "cam"

# Signals a reload holds from just before its exec until the new process has its handlers.
HELD_ACROSS_RELOAD = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}


@dataclass
class Picture:
    """What an overlay is drawn on: the smallest picture kept of what the model saw."""

    image: np.ndarray
    box: Box | None  # where the model's box falls on it; None: all of it


@dataclass
class Prepared:
    """A frame scaled to the model's input. The full frame itself is not kept: only its times
    and the picture overlays need, so frames in flight between the threads cost little memory."""

    ts: float  # wall-clock capture time
    mono: float  # monotonic capture time
    x: np.ndarray
    box: Box
    picture: Picture
    age_ms: float  # capture to the start of scaling
    pre_ms: float


@dataclass
class Inferred:
    """What the loop thread hands the finisher: one frame's inference."""

    prepared: Prepared
    inference: Inference
    extra: list[int]
    timing: dict[str, float]


@dataclass
class Requests:
    """Classes whose CAM is wanted in the next results besides the top-1 (set by commands)."""

    classes: dict[int, int] = field(default_factory=dict)  # class id -> frames left

    def take(self) -> list[int]:
        wanted = list(self.classes)
        for c in wanted:
            self.classes[c] -= 1
            if self.classes[c] <= 0:
                del self.classes[c]
        return wanted


def published_map(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map as published: raw, or resized when the config asks for a size."""
    if not width:
        return cam
    return cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def overlay_source(frame: Frame, view: np.ndarray | None, box: Box) -> Picture:
    """Preferred, in order: the source's display stream (the model saw all of it); the
    scaled-down view preprocessing made on the way to the model, when the model saw the
    whole frame; else the frame itself."""
    if frame.display is not None:
        return Picture(frame.display, None)
    h, w = frame.image.shape[:2]
    if view is not None and box == (0, 0, w, h):
        return Picture(view, None)
    return Picture(frame.image, box)


def overlay_jpeg(picture: Picture, cam: np.ndarray, cfg: Config) -> bytes:
    lp = cfg.loop
    width, height = lp.overlay_width, lp.overlay_height
    box: Box = (0, 0, width, height)
    if picture.box is not None:
        h, w = picture.image.shape[:2]
        sx, sy = width / w, height / h
        x0, y0, x1, y1 = picture.box
        box = (round(x0 * sx), round(y0 * sy), max(round(x1 * sx), 1), max(round(y1 * sy), 1))
    img = overlay(resize_picture(picture.image, width, height), cam, lp.overlay_style, box)
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, lp.jpeg_quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


class Daemon:
    """The frame loop and what it answers to.

    `inbox`: commands the sink received (the sink was given `inbox.receive`); `reply`: how the
    loop answers them; `reload_check`: called on SIGHUP, raises EdgecamError when the new
    configuration is not usable; `overlays_changed`: told when a command turns overlays on or off.
    """

    def __init__(
        self,
        cfg: Config,
        clf: Classifier,
        capture: Capture,
        sink: Sink,
        runtime: str = "",
        *,
        inbox: Inbox | None = None,
        reply: Callable[[bytes], None] | None = None,
        reload_check: Callable[[], object] | None = None,
        overlays_changed: Callable[[bool], None] | None = None,
    ) -> None:
        # OpenCV's own thread pool only competes with the pipeline's threads and invoke()'s: scaling
        # a frame is off the loop thread's path anyway, and one thread does it for 40% less CPU.
        cv2.setNumThreads(1)
        self.cfg = cfg
        self.clf = clf
        self.capture = capture
        self.sink = sink
        self.runtime = runtime
        self.device = cfg.device
        self.boot = secrets.token_hex(4)
        self.seq = 0
        self.processed = 0
        # How the run before this one ended (the spool's runs), in every stats message; None: unknown.
        self.previous: dict[str, Any] | None = None
        self.times = StageTimes()
        self.policy = PublishPolicy(cfg.loop.publish, cfg.loop.change_delta, cfg.loop.heartbeat)
        self.overlays = EveryN(cfg.loop.overlay_every)
        self.requests = Requests()
        self.method = make_method(DAEMON_METHOD)
        self.snapshot = threading.Event()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.stopping = False  # a stop signal came: a later SIGHUP does not turn it into a reload
        self.started = time.monotonic()
        self.status = "online"
        # Commands arrive on the network thread, checked; the loop applies them between frames.
        self.inbox = inbox or Inbox(clf.labels, cfg.commands.rate)
        self.reply: Callable[[bytes], None] = reply or (lambda _payload: None)
        self.reload_check = reload_check
        self.overlays_changed = overlays_changed or (lambda _on: None)  # Home Assistant's image entity
        self.handlers: dict[str, Callable[[Command], dict[str, Any]]] = {
            "explain": self._explain,
            "snapshot": self._snapshot,
            "set": self._set,
            "ping": self._ping,
        }
        # One handler for each command the parser knows, no more and no fewer.
        assert set(self.handlers) == set(CHECKS), sorted(set(self.handlers) ^ set(CHECKS))
        self.next_frame = 0.0  # monotonic time the next frame may be taken (loop.max_fps)
        self.last_frame = 0.0  # monotonic time the last one was
        self.notifier = Notifier()
        self.finisher: Stage[Inferred] = Stage("finisher", self.finish)
        self.prefetch: Prefetch[Prepared | None] = Prefetch("prefetch", self.prepare)
        self._infer_ms = self._pre_ms = 0.0

    # -- signals ---------------------------------------------------------------------------
    def install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            # A stop wins over a reload asked for before it (`systemctl reload` then `stop`): the
            # process ends instead of starting over.
            self.stopping = True
            self.reload.clear()
            self.stop.set()
            self.capture.interrupt()

        def hup(_signum: int, _frame: Any) -> None:
            if self.stopping:
                log.info("SIGHUP: stopping already, not reloading")
                return
            # Check the new configuration before letting go of the running one.
            if self.reload_check is not None:
                try:
                    self.reload_check()
                except EdgecamError as exc:
                    log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
                    return
            self.reload.set()
            # A stop signal can run in the middle of this handler (while the check loads the
            # configuration): set first, then look, so that whichever came second, the stop wins.
            if self.stopping:
                self.reload.clear()
                log.info("SIGHUP: stopping already, not reloading")
                return
            log.info("SIGHUP: reloading the configuration (restarting in place)")
            self.stop.set()
            self.capture.interrupt()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        # A reload blocks these across the exec (the mask survives it): one that came meanwhile is
        # pending, and is handled here, now that there is a handler, instead of killing the process
        # (SIGHUP) or being lost (a SIGTERM the old process could no longer act on).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_ACROSS_RELOAD)

    # -- commands (the loop, between frames) -------------------------------------------------
    def apply_commands(self) -> None:
        # `seq` in the reply is the last result made before, so a consumer knows exactly which
        # results the command shaped (those after it).
        cmds = self.inbox.take()
        if cmds:
            # Frames already handed to the finisher were inferred before the command: finish
            # them first, so that `seq` below is exactly the last result the command did not shape.
            self.finisher.wait()
        for cmd in cmds:
            try:
                fields = self.handlers[cmd.cmd](cmd)
            except CommandError as exc:
                self.reply(self.inbox.refuse(cmd.id, str(exc)))
                continue
            self.inbox.count("accepted")
            self.reply(reply(cmd.id, True, cmd=cmd.cmd, **fields, seq=self.seq))

    def refuse_commands(self) -> None:
        """The loop has ended: commands still waiting, and those that come while the spool drains,
        are answered with a refusal (the replies go out with the drain) instead of vanishing."""
        doing = "reloading its configuration" if self.reload.is_set() else "stopping"
        why = f"the device is {doing}: not carried out; send it again once it is online"
        for cmd in self.inbox.close(why):
            self.reply(self.inbox.refuse(cmd.id, why))

    def _explain(self, cmd: Command) -> dict[str, Any]:
        assert cmd.cls is not None
        wanted = self.requests.classes
        if cmd.cls not in wanted and len(wanted) >= MAX_CLASSES:
            raise CommandError(f"explain: {MAX_CLASSES} classes are asked for already, the most a result carries "
                               "besides its top-1; ask again when their frames have passed")
        wanted[cmd.cls] = cmd.frames
        return {"class": cmd.cls, "label": self.clf.labels[cmd.cls], "frames": cmd.frames}

    def _snapshot(self, cmd: Command) -> dict[str, Any]:
        self.snapshot.set()
        return {}

    def _set(self, cmd: Command) -> dict[str, Any]:
        self.set_knobs(cmd.changes)
        return {k: getattr(self.cfg.loop, k) for k in cmd.changes}

    def _ping(self, cmd: Command) -> dict[str, Any]:
        return {"device": self.device, "boot": self.boot, "uptime_s": round(time.monotonic() - self.started, 1),
                "status": self.status}

    def set_knobs(self, changes: dict[str, Any]) -> None:
        lp = self.cfg.loop
        for key, value in changes.items():
            setattr(lp, key, value)
        if {"publish", "change_delta", "heartbeat"} & set(changes):
            self.policy = PublishPolicy(lp.publish, lp.change_delta, lp.heartbeat)
        if "overlay_every" in changes:
            self.overlays = EveryN(lp.overlay_every)
            self.overlays_changed(lp.overlay_every > 0)
        if "max_fps" in changes:
            # The next frame was timed at the old rate (at 0.001 fps, 1000 s away): time it at the new one.
            self.next_frame = self.last_frame + 1.0 / lp.max_fps if lp.max_fps > 0 else 0.0
        log.info("commands: set %s", ", ".join(f"{k}={v}" for k, v in changes.items()))

    # -- the loop ------------------------------------------------------------------------------
    def run(self, max_frames: int = 0) -> int:
        """The loop; returns how many messages stay undelivered in the spool."""
        # A source that failed to open is degraded from the first status the broker gets, not after a read timeout.
        self.update_status()
        self.sink.start()
        self.capture.start()
        log.info(
            "running: %s on %s, model %s (%s), device %s",
            self.capture.source.description, self.runtime, self.clf.name,
            f"{self.clf.input.width}x{self.clf.input.height}", self.device,
        )
        # Ready: the model is loaded, the source open (or being retried), the broker being dialled.
        self.notifier.ready(self.status_line())
        try:
            self.frames(max_frames)
        finally:
            try:
                # What was handed over is finished (and spooled) before anything is closed.
                self.finisher.close()
            finally:
                # Also when the finisher failed: the camera is let go, and what the spool holds
                # is still delivered or left closed in its file. A frame being read ends first
                # (a take() waiting for one returns at once), so no read runs into the source's close.
                self.capture.interrupt()
                self.prefetch.close()
                self.refuse_commands()
                if self.reload.is_set():
                    self.notifier.reloading()
                else:
                    self.notifier.stopping()
                self.capture.stop()
                self.sink.drain(self.cfg.mqtt.shutdown_timeout)
                self.publish_stats()
                left = self.sink.close(2.0)
        return left

    def frames(self, max_frames: int = 0) -> None:
        """Frames until stopped, the source ends, or `max_frames` (0: no limit) more were inferred."""
        lp = self.cfg.loop
        next_stats = time.monotonic() + min(lp.stats_interval, 2.0)
        done = 0
        while not self.stop.is_set():
            self.notifier.watchdog()
            self.apply_commands()
            period = 1.0 / lp.max_fps if lp.max_fps > 0 else 0.0
            now = time.monotonic()
            if period and now < self.next_frame:
                # Short waits: commands (a new max_fps among them) and stats go on meanwhile.
                self.stop.wait(min(self.next_frame - now, 0.25))
            else:
                try:
                    # At most a second: the watchdog, commands and stats go on while a source is
                    # silent for up to source.read_timeout (600 s allowed, the unit's WatchdogSec is 30).
                    job = self.prefetch.get(self.stop, timeout=1.0)
                except SourceEnded:
                    if not self.stop.is_set():
                        log.info("source: %s ended", self.capture.source.description)
                    break
                self.update_status()
                if job is not None:
                    self.last_frame = time.monotonic()
                    self.next_frame = max(self.next_frame + period, self.last_frame) if period else 0.0
                    if not period and not (max_frames and done + 1 >= max_frames):
                        # Flat out: the next frame is read and scaled while this one is in invoke(),
                        # started so that it is ready as invoke() ends, not earlier: a frame taken
                        # at once would wait out the whole invoke() and be that much older.
                        lead = self._infer_ms - self._pre_ms - 0.2
                        self.prefetch.request(time.monotonic() + max(lead, 0.0) / 1e3)
                    self.step(job)
                    self._pre_ms += 0.1 * (job.pre_ms - self._pre_ms)
                    done += 1
                    if max_frames and done >= max_frames:
                        break
            if time.monotonic() >= next_stats:
                self.publish_stats()
                next_stats = time.monotonic() + lp.stats_interval

    def prepare(self) -> Prepared | None:
        """The next frame scaled to the model's input (prefetch thread); None when none came in time."""
        frame = self.capture.take()
        if frame is None:
            return None
        age = (time.monotonic() - frame.mono) * 1e3
        t0 = time.perf_counter()
        keep: dict = {}
        x, box = to_input(frame.image, self.clf.input, self.cfg.model.crop, keep=keep)
        picture = overlay_source(frame, keep.get("view"), box)
        return Prepared(frame.ts, frame.mono, x, box, picture, age, (time.perf_counter() - t0) * 1e3)

    def update_status(self) -> None:
        """online, or degraded while the source fails; a change is published at once, with stats."""
        status = "degraded" if self.capture.stats.state == "degraded" else "online"
        if status != self.status:
            self.status = status
            self.sink.set_status(status)
            self.publish_stats()

    def step(self, job: Prepared) -> None:
        """One frame on the loop thread: one invoke(); the rest goes to the finisher."""
        t: dict[str, float] = {"capture_age": job.age_ms, "pre": job.pre_ms}
        extra = self.requests.take()
        t0 = time.perf_counter()
        inf = self.clf.infer(job.x)
        t["infer"] = (time.perf_counter() - t0) * 1e3
        self._infer_ms += 0.1 * (t["infer"] - self._infer_ms)  # running means, for the prefetch's timing
        self.processed += 1
        self.finisher.put(Inferred(job, inf, extra, t))

    def finish(self, job: Inferred) -> None:
        """Top-k, the CAMs, the publish decision, encoding and the spool: on the finisher thread,
        while the loop thread runs the next frame's invoke()."""
        lp = self.cfg.loop
        t = job.timing
        t0 = time.perf_counter()
        exp = explain_inference(self.clf, job.inference, job.prepared.box, 3, job.extra, None, self.method)
        t1 = time.perf_counter()
        t["cam"] = (t1 - t0) * 1e3
        # Capture to CAM ready, waits between the threads included: what a consumer calls latency.
        t["total"] = (time.monotonic() - job.prepared.mono) * 1e3
        top_id, _, top_score = exp.top[0]
        if self.policy.decide(top_id, top_score, time.monotonic()):
            seq = self.seq + 1  # counted below, once the result is in the spool
            labels = self.clf.labels
            maps = [published_map(m, lp.heatmap_width, lp.heatmap_height) for m in exp.cams]
            payload = result_payload(
                device=self.device,
                boot=self.boot,
                seq=seq,
                ts=job.prepared.ts,
                model=self.clf.name,
                top=exp.top,
                cam_id=exp.cam_ids[0],
                cam_label=labels[exp.cam_ids[0]],
                cam=maps[0],
                timing_ms={k: t[k] for k in ("capture_age", "pre", "infer", "cam", "total")},
                extra_cams=[(c, labels[c], m) for c, m in zip(exp.cam_ids[1:], maps[1:], strict=True)],
                # Before NTP (no RTC on a Pi) `ts` may be the time of the last shutdown: say so.
                clock="unsynced" if clock_synced() is False else None,
            )
            t2 = time.perf_counter()
            self.sink.result(payload, seq)
            self.seq = seq
            t3 = time.perf_counter()
            t["encode"], t["publish"] = (t2 - t1) * 1e3, (t3 - t2) * 1e3
            t["handover"] = (time.monotonic() - job.prepared.mono) * 1e3
            if self.overlays.due() or self.snapshot.is_set():
                self.snapshot.clear()
                jpeg = overlay_jpeg(job.prepared.picture, exp.cams[0], self.cfg)
                t4 = time.perf_counter()
                self.sink.overlay(jpeg)
                t["overlay"] = (t4 - t3) * 1e3
                t["publish"] += (time.perf_counter() - t4) * 1e3
        self.times.add(t, time.monotonic())

    def stats(self) -> dict[str, Any]:
        cap = self.capture.stats
        counts = self.sink.counts
        return {
            "device": self.device,
            "boot": self.boot,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "state": "ok" if cap.state in ("ok", "ended") else cap.state,
            "status": self.status,
            "reason": cap.reason,
            "source": self.capture.source.description,
            "fps": round(self.times.fps(), 2),
            "frames": {
                "captured": cap.captured,
                "dropped": cap.dropped,
                "processed": self.processed,
                "results": self.seq,
                "published": counts.get("published", 0),
                "overlays": counts.get("overlays", 0),
                "acked": counts.get("acked", 0),
            },
            "spool": self.sink.spool_counts,
            "commands": self.inbox.counts(),
            "mqtt": {"connected": self.sink.connected, "connects": counts.get("connects", 0)},
            "timing_ms": self.times.medians(),
            "model": self.clf.name,
            "runtime": self.runtime,
            "threads": self.clf.num_threads,
            "cpu_temp_c": cpu_temperature(),
            **({"previous": self.previous} if self.previous is not None else {}),
        }

    def publish_stats(self) -> None:
        self.sink.stats(stats_payload(**self.stats()))
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """systemd's STATUS=, what `systemctl status edgecam` shows."""
        cap = self.capture.stats
        counts = self.sink.counts
        mqtt = "connected" if self.sink.connected else "broker unreachable"
        waiting = counts.get("waiting", 0)
        spool = f", {waiting} waiting in the spool" if waiting else ""
        state = f"degraded: {cap.reason}" if cap.state == "degraded" else "ok"
        return f"{self.times.fps():.1f} fps, {state}, {mqtt}{spool}"
