"""edgecam against a real Home Assistant Core, all on loopback: prints one PASS or FAIL line per check.

    .venv/bin/python bench/homeassistant_check.py --hass /path/to/ha-venv/bin/hass [--keep]

Home Assistant is large and not a dependency; install it once in its own Python 3.13 environment,
e.g. (2025.4.4 is the last release that allows Python 3.13.0; paho-mqtt is what its MQTT integration
would otherwise install at first start):

    ~/.pyenv/versions/3.13.0/bin/python -m venv /work/ha-venv
    /work/ha-venv/bin/pip install homeassistant==2025.4.4 paho-mqtt==2.1.0

What it does: starts a Mosquitto on a free loopback port, a Home Assistant with a fresh configuration
directory listening on 127.0.0.1 only, onboards it over its HTTP API (the user and the integration
steps; the core-config step, which sets up integrations that reach the internet, and analytics are
skipped), adds the MQTT integration through its config flow, then runs `edgecam run` devices with
discovery on and reads Home Assistant's own view through its REST API (/api/states):

- the entities appear with the ids edgecam asks for, the label sensor shows the first synonym with the
  full label and the top 3 as attributes, the score sensor is a number (state class measurement, %),
  the image entity is there while overlays are on;
- a device whose camera is missing is unavailable (status "degraded") from the start;
- a stopped device is unavailable (status "offline"), and so is a killed one (its Last Will);
- overlays off: the image entity is removed; a command turning them on and off adds and removes it;
- Home Assistant restarted: the label is back at once (from the birth message), not `unknown`
  until the next result (the device here publishes on change with a one-hour heartbeat);
- Home Assistant's log has no warning or error about these entities.

A script, not a test: Home Assistant takes minutes to install and a minute to start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from broker import Broker, Recorder, free_port, publish  # noqa: E402

SHARED = Path(os.environ.get("EDGECAM_SHARED", ROOT.parent / "shared")).resolve()
DEVICE = "ha-check"
GONE = "ha-gone"  # a device whose camera is missing
PREFIX = "sensor.edgecam_ha_check"
IMAGE = "image.edgecam_ha_check_overlay"

CONFIG = """\
homeassistant:
  name: edgecam check
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
onboarding:
logger:
  default: warning
"""

failures: list[str] = []


def check(name: str, ok: bool, detail: Any = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}" + ("" if ok or detail == "" else f": {detail}"), flush=True)
    if not ok:
        failures.append(name)
    return ok


def wait(pred: Callable[[], Any], timeout: float, step: float = 0.5) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


class HomeAssistant:
    def __init__(self, hass: str, config: Path, port: int) -> None:
        self.hass, self.config, self.port = hass, config, port
        self.base = f"http://127.0.0.1:{port}"
        self.client_id = self.base + "/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.refresh = ""
        self.log = config / "hass.out"

    def start(self) -> float:
        """Start and wait until the HTTP API answers; returns the seconds it took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.hass, "-c", str(self.config)], stdout=out, stderr=out,
                                         cwd=self.config, start_new_session=True)
        if not wait(lambda: self.proc.poll() is not None or self.request("GET", "/api/onboarding", auth=False)
                    is not None, 600, 1):
            raise SystemExit(f"Home Assistant did not answer on {self.base} within 600 s; see {self.log}")
        if self.proc.poll() is not None:
            raise SystemExit(f"Home Assistant exited ({self.proc.returncode}); see {self.log}")
        if self.refresh:
            self.token = self.form("/auth/token", grant_type="refresh_token", refresh_token=self.refresh,
                                   client_id=self.client_id)["access_token"]
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        """The JSON answer, or None when Home Assistant is not (yet) listening."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise SystemExit(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        except (ConnectionError, urllib.error.URLError, TimeoutError):
            return None

    def form(self, path: str, **fields: str) -> Any:
        req = urllib.request.Request(self.base + path, data=urllib.parse.urlencode(fields).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def onboard(self) -> None:
        user = self.request("POST", "/api/onboarding/users", {
            "client_id": self.client_id, "name": "edgecam", "username": "edgecam",
            "password": "edgecam-check-only", "language": "en"}, auth=False)
        tokens = self.form("/auth/token", grant_type="authorization_code", code=user["auth_code"],
                           client_id=self.client_id)
        self.token, self.refresh = tokens["access_token"], tokens["refresh_token"]
        # core_config would set up google_translate, met and radio_browser, which reach the internet.
        self.request("POST", "/api/onboarding/analytics", {})
        self.request("POST", "/api/onboarding/integration",
                      {"client_id": self.client_id, "redirect_uri": self.base + "/?auth_callback=1"})

    def add_mqtt(self, port: int) -> dict[str, Any]:
        flow = self.request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        while flow.get("type") == "form":
            fields = {"broker": "127.0.0.1", "port": port} if flow["step_id"] == "broker" else {}
            flow = self.request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}", fields)
        return flow

    def states(self) -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in self.request("GET", "/api/states") or []}

    def state(self, entity: str) -> dict[str, Any] | None:
        return self.request("GET", f"/api/states/{entity}")


class Edgecam:
    """`edgecam run` as its own process, like the service."""

    def __init__(self, work: Path, broker: Broker, device: str, source: Path | str, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.log = work / f"edgecam-{device}-{int(time.time() * 1000)}.log"
        environ = {**os.environ, "EDGECAM_SPOOL_DIR": str(work / "state"), "EDGECAM_MODEL_DIR": str(work / "models"),
                   "EDGECAM_MODEL_MIRROR": str(SHARED / "models"), "EDGECAM_HOMEASSISTANT_DISCOVERY": "true",
                   **(env or {})}
        cmd = [sys.executable, "-m", "edgecam", "run", "--source", str(source), "--source-fps", "2",
               "--broker", broker.address, "--device-id", device, *args]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out, env=environ, cwd=ROOT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def first_synonym(label: str) -> str:
    return label.split(",")[0].strip() or label


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hass", default=os.environ.get("HASS") or shutil.which("hass") or "",
                    help="Home Assistant's `hass` executable (default: $HASS, else hass on PATH)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (configs and logs)")
    args = ap.parse_args()
    if not args.hass or not Path(args.hass).exists():
        print("homeassistant_check: no Home Assistant: pass --hass /path/to/venv/bin/hass (see the docstring for "
              "how to install it)", file=sys.stderr)
        return 2
    version = subprocess.run([args.hass, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"Home Assistant Core {version}, edgecam from {ROOT}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")

    work = Path(tempfile.mkdtemp(prefix="edgecam-ha-"))
    config = work / "config"
    config.mkdir()
    port = free_port()
    (config / "configuration.yaml").write_text(CONFIG.format(port=port))
    broker = Broker(work / "broker").start()
    ha = HomeAssistant(args.hass, config, port)
    devices: list[Edgecam] = []
    try:
        print(f"Home Assistant up in {ha.start():.0f} s on {ha.base}", flush=True)
        ha.onboard()
        entry = ha.add_mqtt(broker.port)
        check("MQTT integration added over the HTTP API", entry.get("type") == "create_entry", entry)
        rec = Recorder(broker.port, [f"edgecam/{DEVICE}/#", "homeassistant/status"])

        def results(since: int = 0) -> list[dict[str, Any]]:
            return [json.loads(p) for t, p, _ in list(rec.messages)[since:] if t.endswith("/result")]

        if not wait(lambda: any(t == "homeassistant/status" for t, _, _ in rec.messages), 120):
            check("Home Assistant's birth message", False, "none on homeassistant/status within 120 s")

        # 1. A device with overlays on, every result published.
        cam = Edgecam(work, broker, DEVICE, SHARED / "images", "--overlay-every", "1")
        devices.append(cam)
        wanted = [f"{PREFIX}_top1", f"{PREFIX}_score", f"{PREFIX}_fps", IMAGE]

        def discovered() -> bool:
            s = ha.states()
            return all(e in s for e in wanted) and all(s[e]["state"] not in ("unknown", "unavailable")
                                                       for e in wanted[:2])

        found = wait(lambda: cam.proc.poll() is not None or discovered(), 180)
        if cam.proc.poll() is not None:
            check("edgecam runs", False, cam.log.read_text(errors="replace")[-500:])
            return 1
        states = ha.states()
        check("entities discovered with the ids edgecam asks for", bool(found),
              sorted(e for e in states if "edgecam_" in e))
        if not found:
            return 1
        labels = {r["top"][0]["label"] for r in results()}

        def label_matches() -> dict[str, Any] | None:
            s = ha.state(f"{PREFIX}_top1")
            return s if s and s["attributes"].get("label") in labels and \
                s["state"] == first_synonym(s["attributes"]["label"]) else None

        top1 = wait(label_matches, 30)
        check("top label: first synonym as the state, the full label as an attribute", bool(top1),
              ha.state(f"{PREFIX}_top1"))
        if top1:
            attrs = top1["attributes"]
            check("top label: top 3 with scores as an attribute",
                  isinstance(attrs.get("top3"), list) and len(attrs["top3"]) == 3
                  and all({"id", "label", "score"} <= set(t) for t in attrs["top3"]), attrs)
        hotdog = wait(lambda: (s := ha.state(f"{PREFIX}_top1")) and s["attributes"].get("label")
                      == "hotdog, hot dog, red hot" and s, 60, 0.2)
        check("hot_dog.jpg shows as 'hotdog' (label 'hotdog, hot dog, red hot')",
              bool(hotdog) and hotdog["state"] == "hotdog", hotdog)
        score = ha.state(f"{PREFIX}_score")
        try:
            value = float(score["state"])
        except (TypeError, ValueError, KeyError):
            value = -1.0
        check("top score: a number from 0 to 100, unit %, state class measurement",
              0 <= value <= 100 and score["attributes"].get("unit_of_measurement") == "%"
              and score["attributes"].get("state_class") == "measurement", score)
        fps = wait(lambda: (s := ha.state(f"{PREFIX}_fps")) and s["state"] not in ("unknown", "unavailable") and s, 60)
        check("frames per second: a number", bool(fps) and float(fps["state"]) >= 0, fps)
        image = wait(lambda: (s := ha.state(IMAGE)) and s["state"] not in ("unknown", "unavailable") and s, 60)
        check("overlay image entity has a picture", bool(image), ha.state(IMAGE))

        # 2. A device whose camera is missing: unavailable from the first status on.
        gone = Edgecam(work, broker, GONE, "/dev/video9")
        devices.append(gone)
        gone_top = "sensor.edgecam_ha_gone_top1"
        seen = wait(lambda: (s := ha.state(gone_top)) and s, 120)
        check("missing camera (status degraded): entities unavailable from the start",
              bool(seen) and seen["state"] == "unavailable", seen)
        gone.stop()

        # 3. The device stops: offline, unavailable.
        cam.stop()
        down = wait(lambda: all(ha.state(e)["state"] == "unavailable" for e in wanted), 30)
        check("device stopped (status offline): all its entities unavailable", bool(down),
              {e: ha.state(e)["state"] for e in wanted})

        # 4. Overlays off, publish on change with a one-hour heartbeat: no image entity, one result.
        one = work / "one"
        one.mkdir()
        shutil.copy(SHARED / "images" / "hot_dog.jpg", one / "hot_dog.jpg")
        cam = Edgecam(work, broker, DEVICE, one, "--overlay-every", "0", "--publish", "change",
                      env={"EDGECAM_LOOP_HEARTBEAT": "3600", "EDGECAM_COMMANDS_ENABLED": "on",
                           "EDGECAM_MQTT_KEEPALIVE": "5"})
        devices.append(cam)
        mark = len(rec.messages)
        first = wait(lambda: results(mark)[:1], 120)
        # Available again at once shows the label from before the stop: wait for this process's result.
        back = first and wait(lambda: (s := ha.state(f"{PREFIX}_top1")) and s["state"] == "hotdog"
                              and s["attributes"].get("captured") == first[0]["ts"] and s, 60)
        check("device back: its new result shown", bool(back), ha.state(f"{PREFIX}_top1"))
        removed = wait(lambda: IMAGE not in ha.states(), 30)
        check("overlays off: the image entity is removed", bool(removed), ha.state(IMAGE))
        cmd = f"edgecam/{DEVICE}/cmd"
        publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 1}))
        added = wait(lambda: IMAGE in ha.states(), 30)
        publish(broker.port, cmd, json.dumps({"cmd": "set", "overlay_every": 0}))
        removed = added and wait(lambda: IMAGE not in ha.states(), 30)
        check("command set overlay_every 1 then 0: the image entity added, then removed again",
              bool(added) and bool(removed), {"added": bool(added), "removed": bool(removed)})

        # 5. Home Assistant restarts; the device publishes nothing new (same picture, no heartbeat due).
        seqs = {(r["boot"], r["seq"]) for r in results()}
        ha.stop()
        mark = len(rec.messages)
        took = ha.start()
        after = wait(lambda: (s := ha.state(f"{PREFIX}_top1")) and s["state"] not in ("unknown", "unavailable")
                     and s, 60)
        new = {(r["boot"], r["seq"]) for r in results(mark)} - seqs
        check(f"Home Assistant restarted (up in {took:.0f} s): label back from the birth message",
              bool(after) and after["state"] == "hotdog" and after["attributes"].get("captured") == first[0]["ts"]
              and not new,
              {"state": ha.state(f"{PREFIX}_top1"), "new results": sorted(new)})
        score = ha.state(f"{PREFIX}_score")
        check("after the restart: score back as a number", score is not None and
              score["state"].replace(".", "", 1).isdigit(), score)
        check("after the restart: the image entity stays removed", IMAGE not in ha.states(), ha.state(IMAGE))

        # 6. The device dies without a word: the broker sends its Last Will after 1.5 keepalives (5 s here).
        cam.proc.kill()
        cam.proc.wait()
        down = wait(lambda: ha.state(f"{PREFIX}_top1")["state"] == "unavailable", 30)
        check("device killed (SIGKILL): unavailable through its Last Will", bool(down), ha.state(f"{PREFIX}_top1"))

        # 7. Nothing in Home Assistant's log about these entities.
        log = ha.log.read_text(errors="replace")  # both runs' output
        bad = [line for line in log.splitlines() if ("WARNING" in line or "ERROR" in line)
               and ("mqtt" in line.lower() or "edgecam" in line.lower() or "template" in line.lower())]
        check("Home Assistant logged no warning or error about MQTT, templates or edgecam", not bad, bad[:5])
        rec.close()
    finally:
        for d in devices:
            d.stop()
        ha.stop()
        broker.stop()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'FAIL' if failures else 'PASS'}: {len(failures)} check(s) failed" if failures else "PASS: all checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
