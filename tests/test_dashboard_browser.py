"""The dashboard in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
two daemons publishing from the shared images through a real Mosquitto, `edgecam dashboard`
serving the page. Screenshots go to screenshots/ (ignored by git) to be looked at."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Broker, free_port, publish
from conftest import IMAGES, ROOT, run_cli

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
    port = free_port()
    dash = subprocess.Popen(
        [sys.executable, "-m", "edgecam", "dashboard", "--broker", broker.address, "--listen", f"127.0.0.1:{port}",
         "--username", "dash", "--stale-after", "4"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "dashboard.log").open("wb"), cwd=ROOT, env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait(lambda: urllib.request.urlopen(url + "healthz", timeout=1).status == 200, 30, "the dashboard")
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
        assert dash.poll() is None
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
    finally:
        dash.send_signal(signal.SIGTERM)
        try:
            dash.wait(10)
        except subprocess.TimeoutExpired:
            dash.kill()
    assert dash.returncode == 0, (tmp_path / "dashboard.log").read_text()
