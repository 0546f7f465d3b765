"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
two daemons publishing from the shared images through a real Mosquitto, `edgecam dashboard`
serving the page. Screenshots go to screenshots/ (ignored by git) to be looked at."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from broker import Broker, free_port, publish
from conftest import IMAGES, ROOT, run_cli
from paho.mqtt.enums import CallbackAPIVersion

from edgecam.contract import result_payload

pytestmark = pytest.mark.usefixtures("model_cache")

SHOTS = ROOT / "screenshots"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromedriver are needed (tests/run.sh installs the Debian packages)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def wait(cond: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = cond()
        except Exception:  # the page is still changing under the query
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def tile(drv: Any, device: str) -> Any:
    return drv.find_element("css selector", f'.tile[data-device="{device}"]')


# The page re-renders a tile on every result, so an element found a moment ago may be gone by
# the next WebDriver call. These read in one script run, which the page cannot interleave.
def attrs(drv: Any, css: str, name: str) -> list[str | None]:
    return drv.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]));", css, name)


def attr(drv: Any, css: str, name: str) -> str | None:
    found = attrs(drv, css, name)
    return found[0] if found else None


def tile_attr(drv: Any, device: str, name: str) -> str | None:
    return attr(drv, f'.tile[data-device="{device}"]', name)


def shot(drv: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    drv.save_screenshot(str(SHOTS / f"dashboard-{name}.png"))


def one_image_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / Path(name).stem
    folder.mkdir()
    (folder / name).write_bytes((IMAGES / name).read_bytes())
    return folder


@contextlib.contextmanager
def served(broker: Broker, tmp_path: Path, *args: str) -> Iterator[str]:
    """`edgecam dashboard ARGS` serving; its URL. Stopped with SIGTERM after, which must end it cleanly."""
    port = free_port()
    log = tmp_path / f"dashboard-{port}.log"
    dash = subprocess.Popen(
        [sys.executable, "-m", "edgecam", "dashboard", "--broker", broker.address, "--listen", f"127.0.0.1:{port}",
         *args],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"), cwd=ROOT, env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait(lambda: urllib.request.urlopen(url + "healthz", timeout=1).status == 200, 30, "the dashboard")
        yield url
    finally:
        dash.send_signal(signal.SIGTERM)
        try:
            dash.wait(10)
        except subprocess.TimeoutExpired:
            dash.kill()
    assert dash.returncode == 0, log.read_text()


@contextlib.contextmanager
def commands_answered(broker: Broker, dev: str, reply: dict[str, Any]) -> Iterator[None]:
    """A client on the broker answering `dev`'s commands with `reply`, as a device would."""
    subscribed = threading.Event()
    device = paho.Client(CallbackAPIVersion.VERSION2)

    def answer(c: paho.Client, _u: Any, msg: Any) -> None:
        c.publish(msg.topic + "/reply", json.dumps({**reply, "id": json.loads(msg.payload)["id"]}), qos=1)

    device.on_subscribe = lambda *_: subscribed.set()
    device.on_message = answer
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        device.subscribe(f"edgecam/{dev}/cmd", qos=1)
        assert subscribed.wait(30)
        yield
    finally:
        device.disconnect()
        device.loop_stop()


def explained(image: Path) -> str:
    proc = run_cli("explain", "--json", image)
    return json.loads(proc.stdout)["top"][0]["label"].split(",")[0]


def test_dashboard_in_a_real_browser(broker: Broker, daemons, tmp_path: Path, browser: Any) -> None:
    cats, parrots = one_image_folder(tmp_path, "cat.bmp"), one_image_folder(tmp_path, "parrot.jpg")
    on = {"EDGECAM_COMMANDS_ENABLED": "on"}
    yard = daemons("--source", cats, "--source-fps", "2", "--broker", broker.address, "--device-id", "yard-cam",
                   env=on)
    aviary = daemons("--source", parrots, "--source-fps", "2", "--broker", broker.address,
                     "--device-id", "aviary-cam", "--overlay-every", "2")
    with served(broker, tmp_path, "--username", "dash", "--stale-after", "4") as url:
        browser.get(url)
        wait(lambda: len(browser.find_elements("css selector", ".tile[data-seq]:not([data-seq=''])")) == 2, 60,
             "two tiles with results")
        # The labels explain gives for the same pictures.
        assert tile_attr(browser, "yard-cam", "data-top1") == explained(cats / "cat.bmp")
        assert tile_attr(browser, "aviary-cam", "data-top1") == explained(parrots / "parrot.jpg")
        assert attrs(browser, ".tile", "data-device") == [
            "aviary-cam", "yard-cam"]
        for dev in ("yard-cam", "aviary-cam"):
            assert len(attrs(browser, f'.tile[data-device="{dev}"] .bar', "class")) == 3
        # Live updates, pushed: the sequence number moves without a reload.
        seq = int(tile_attr(browser, "yard-cam", "data-seq"))
        wait(lambda: int(tile_attr(browser, "yard-cam", "data-seq")) >= seq + 2, 30, "newer results")
        # No overlays from yard-cam: its decoded heatmap, coloured, over a neutral background.
        coloured = browser.execute_script(
            "const c = document.querySelector('.tile[data-device=\"yard-cam\"] canvas');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i+1] || d[i+1] !== d[i+2]) n++;"
            "return n / (d.length / 4);"
        )
        assert coloured > 0.9, coloured
        # aviary-cam sends overlays: the tile shows the JPEG.
        wait(lambda: browser.execute_script(
            "const i = document.querySelector('.tile[data-device=\"aviary-cam\"] img');"
            "return i && i.complete && i.naturalWidth === 320 && i.naturalHeight === 240;"), 30, "the overlay image")
        shot(browser, "fleet")

        # The detail view: timeline, large heatmap, timings, and a snapshot asked of the device.
        wait(lambda: tile(browser, "yard-cam").click() is None, 10, "a click on yard-cam's tile")
        wait(lambda: "open" in browser.find_element("id", "detail").get_attribute("class"), 10, "the detail view")
        wait(lambda: browser.find_elements("css selector", "#timeline div[data-label]"), 10, "the timeline")
        assert browser.execute_script("return document.getElementById('d-snap').hidden;")  # no overlay yet
        assert attr(browser, "#timeline div[data-label]", "data-label") == \
            explained(cats / "cat.bmp")
        assert len(attrs(browser, "#d-times tr", "class")) >= 5
        assert browser.find_element("id", "controls").is_displayed()
        browser.find_element("id", "c-class").send_keys("tabby")
        browser.find_element("id", "c-explain").click()
        wait(lambda: browser.find_element("id", "reply").text.startswith("ok"), 20, "the explain reply")
        assert '"class":282' in browser.find_element("id", "reply").text.replace(" ", "")
        # The snapshot's overlay shows on yard-cam's tile only until the next result (it sends no
        # others), so catch the moment it loads rather than hoping to look at the right time.
        browser.execute_script(
            "window.__snap = false; document.addEventListener('load', (e) => { const i = e.target;"
            " if (i.tagName === 'IMG' && i.src.includes('/overlay/yard-cam.jpg') && i.naturalWidth === 320)"
            " window.__snap = true; }, true);")
        browser.find_element("id", "c-snapshot").click()
        wait(lambda: re.fullmatch(r'ok: \{"cmd":"snapshot","seq":\d+\}', browser.find_element("id", "reply").text), 20,
             "the snapshot reply")
        wait(lambda: browser.execute_script("return window.__snap;"), 30, "the snapshot overlay on yard-cam's tile")
        # The detail view keeps it (yard-cam sends no other overlays), with its age.
        wait(lambda: browser.execute_script(
            "const i = document.getElementById('d-overlay');"
            "return !document.getElementById('d-snap').hidden && i.complete && i.naturalWidth === 320;"), 30,
             "the snapshot in the detail view")
        assert attr(browser, "#d-overlay-at", "class") == "meta"
        assert browser.find_element("id", "d-overlay-at").text.startswith("received ")
        shot(browser, "detail")
        browser.find_element("id", "d-close").click()

        # Bad data on the broker breaks nothing.
        publish(broker.port, "edgecam/yard-cam/result", b"{not json")
        publish(broker.port, "edgecam/yard-cam/result", json.dumps({"v": 2, "device": "yard-cam"}))
        publish(broker.port, "edgecam/ghost/result", b"x" * 300_000)
        publish(broker.port, "edgecam/yard-cam/status", b"on fire")
        seq = int(tile_attr(browser, "yard-cam", "data-seq"))
        wait(lambda: int(tile_attr(browser, "yard-cam", "data-seq")) > seq, 30, "results after bad data")
        assert len(attrs(browser, ".tile", "class")) == 2

        # A device that stops: offline from its status; one that goes quiet: stale.
        aviary.proc.send_signal(signal.SIGTERM)
        wait(lambda: tile_attr(browser, "aviary-cam", "data-status") == "offline", 30, "aviary offline")
        os.kill(yard.proc.pid, signal.SIGSTOP)
        try:
            wait(lambda: tile_attr(browser, "yard-cam", "data-status") == "stale", 30, "yard-cam stale")
            shot(browser, "offline-and-stale")
        finally:
            os.kill(yard.proc.pid, signal.SIGCONT)
        wait(lambda: tile_attr(browser, "yard-cam", "data-status") == "online", 30, "yard-cam back")

        # A browser that reconnects gets the current state at once.
        browser.refresh()
        wait(lambda: tile_attr(browser, "aviary-cam", "data-status") == "offline", 30, "state after reload")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors


# Markup as the broker could carry it. With no commas: the page shows a label's first synonym.
def markup(where: str) -> str:
    return f'<img src=x onerror="window.xssRan = (window.xssRan || []).concat(\'{where}\')"><b>{where} in bold</b>'


def test_markup_from_the_broker_shows_as_text_and_runs_nothing(broker: Broker, tmp_path: Path,
                                                               browser: Any) -> None:
    """Labels, a status reason, a device's error reply: any client on the broker (or a labels
    file) decides them, so the page must put them in as text. Device ids cannot carry markup
    (the contract's rule); one that tries is not a device."""
    dev = "cam.x_1-A"  # every kind of character the device-id rule allows
    label, reason, error = markup("label"), markup("reason"), markup("error")
    cam = np.arange(49, dtype=np.float32).reshape(7, 7)
    failing = {"ok": False, "device": dev, "error": error}
    with commands_answered(broker, dev, failing), served(broker, tmp_path, "--username", "dash") as url:
        browser.get(url)
        wait(lambda: browser.execute_script("return document.getElementById('conn').textContent === 'live';"), 30,
             "the live stream")
        publish(broker.port, f"edgecam/{dev}/status", b"degraded", retain=True)
        publish(broker.port, f"edgecam/{dev}/stats", json.dumps(
            {"v": 1, "device": dev, "state": "degraded", "reason": reason, "fps": 1.0}))
        publish(broker.port, f"edgecam/{dev}/result", result_payload(
            device=dev, boot="9f2c41d0", seq=7, ts=time.time(), model="m", top=[(1, label, 0.9), (2, "plain", 0.1)],
            cam_id=1, cam_label=label, cam=cam, timing_ms={"total": 1.0}))
        evil_id = '<img src=x onerror="window.xssRan=[1]">'  # a valid MQTT topic level, not a device id
        publish(broker.port, f"edgecam/{evil_id}/status", b"online", retain=True)
        wait(lambda: tile_attr(browser, dev, "data-seq") == "7", 30, "the result")
        wait(lambda: browser.execute_script(
            f"return document.querySelector('.tile[data-device=\"{dev}\"] .reason').textContent;") == reason, 30,
            "the reason")

        # The tile: the label and the reason read back as the very text sent; no element made of them.
        assert browser.find_element("css selector", f'.tile[data-device="{dev}"] .name').text == dev
        assert attr(browser, f'.tile[data-device="{dev}"] .bar .label', "title") == label
        assert browser.execute_script(
            f"return document.querySelector('.tile[data-device=\"{dev}\"] .bar .text').textContent;") == label
        assert tile_attr(browser, dev, "data-top1") == label

        # The detail view: title, timeline, legend, the CAM's class.
        tile(browser, dev).click()
        wait(lambda: browser.find_elements("css selector", "#timeline div[data-label]"), 10, "the timeline")
        assert browser.find_element("id", "d-title").text.startswith(dev + " · ")
        assert attr(browser, "#timeline div[data-label]", "data-label") == label
        assert browser.execute_script("return document.getElementById('legend').textContent;") == label
        assert label in browser.execute_script("return document.getElementById('d-cam').textContent;")

        # A device's error reply.
        browser.find_element("id", "c-class").send_keys("1")
        browser.find_element("id", "c-explain").click()
        wait(lambda: browser.execute_script("return document.getElementById('reply').textContent;") ==
             "error: " + error, 30, "the error reply")

        # The device id that was markup: counted as bad, never a tile.
        wait(lambda: json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())["bad_messages"] >= 1,
             30, "the bad device id counted")
        assert attrs(browser, ".tile", "data-device") == [dev]

        made = browser.execute_script(
            "return [...document.querySelectorAll('b, img')].filter(e => !e.closest('#tiles .picture, #d-snap'))"
            ".map(e => e.outerHTML);")
        assert made == [], made
        # A handler of markup put in the page does run here (the page allows inline script), and
        # would have by the time this one does: so nothing having run means nothing was put in.
        browser.execute_script(
            "const d = document.createElement('div'); d.hidden = true; document.body.append(d);"
            "d.innerHTML = '<img src=x onerror=\"window.canary = true\">';")
        wait(lambda: browser.execute_script("return window.canary === true;"), 10, "the canary's handler")
        assert browser.execute_script("return window.xssRan || null;") is None


def test_a_counted_gap_shows_on_the_tile_as_text(broker: Broker, tmp_path: Path, browser: Any) -> None:
    """The stats' "previous": a run that ended by a power cut is said on the device's tile, in the contract's
    words (gap_text); a later run whose previous one stopped cleanly clears it."""
    dev = "cam-gap"
    boot = '<b onmouseover="window.xssRan=[1]">'  # a boot id is any short string: text, never markup
    stats = {"v": 1, "device": dev, "boot": "cd34", "state": "ok", "fps": 1.0,
             "previous": {"boot": boot, "end": "power_cut", "last_seq": 22, "lost_at_most": 3}}
    gap = f"previous run {boot} ended by a power cut: up to 3 results lost after seq 22"
    shown = f"return document.querySelector('.tile[data-device=\"{dev}\"] .gap')?.textContent;"
    with served(broker, tmp_path) as url:
        browser.get(url)
        wait(lambda: browser.execute_script("return document.getElementById('conn').textContent === 'live';"), 30,
             "the live stream")
        publish(broker.port, f"edgecam/{dev}/status", b"online", retain=True)
        publish(broker.port, f"edgecam/{dev}/stats", json.dumps(stats))
        wait(lambda: browser.execute_script(shown) == gap, 30, "the gap on the tile")
        assert browser.execute_script("return window.xssRan;") is None
        publish(broker.port, f"edgecam/{dev}/stats", json.dumps(
            {**stats, "boot": "ef56", "previous": {"boot": "cd34", "end": "clean", "last_seq": 9, "lost_at_most": 0}}))
        wait(lambda: browser.execute_script(shown) == "", 30, "the gap cleared")
