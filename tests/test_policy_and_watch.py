"""The pure parts of the loop and of `edgecam watch`: publish policy, overlay cadence, stage times,
the text heatmap, result checking and formatting, and broker addresses."""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import numpy as np
import pytest
from broker import Broker, free_port
from conftest import one_error_line, run_cli

from edgecam.broker import host_port
from edgecam.cli.watch import EXIT_NEVER_CONNECTED, EXIT_TOO_FEW, SHADES, check_result, result_line, text_heatmap
from edgecam.contract import PayloadError, decode_cam, result_payload
from edgecam.core.errors import EdgecamError
from edgecam.device.policy import EveryN, PublishPolicy
from edgecam.device.stats import STAGES, StageTimes

# --- PublishPolicy --------------------------------------------------------------------------------


def test_every_publishes_always() -> None:
    p = PublishPolicy("every")
    assert all(p.decide(3, 0.5, float(t)) for t in range(20))
    assert all(p.decide(3, 0.5, 0.0) for _ in range(5))


def test_change_policy() -> None:
    p = PublishPolicy("change", delta=0.1, heartbeat=30)
    assert p.decide(7, 0.50, 0.0) is True  # the first result
    assert p.decide(7, 0.55, 1.0) is False  # same class, moved 0.05
    assert p.decide(7, 0.45, 2.0) is False  # and back the other way
    assert p.decide(7, 0.65, 3.0) is True  # moved 0.15
    assert p.decide(7, 0.60, 4.0) is False
    assert p.decide(8, 0.60, 5.0) is True  # another class
    assert p.decide(7, 0.60, 6.0) is True  # and back
    assert p.decide(7, 0.60, 35.9) is False  # 29.9 s since the last publish
    assert p.decide(7, 0.60, 36.0) is True  # the heartbeat
    assert p.decide(7, 0.60, 37.0) is False  # heartbeat counts from that publish


def test_change_compares_with_the_last_published_score() -> None:
    p = PublishPolicy("change", delta=0.1, heartbeat=30)
    assert p.decide(1, 0.50, 0.0)
    assert not p.decide(1, 0.56, 1.0)  # +0.06
    assert p.decide(1, 0.62, 2.0)  # +0.06 again: 0.12 from the published 0.50
    assert not p.decide(1, 0.68, 3.0)  # 0.06 from the published 0.62
    assert not p.decide(1, 0.53, 4.0)  # -0.09


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        PublishPolicy("sometimes")


# --- EveryN -----------------------------------------------------------------------------------------


def test_every_n() -> None:
    never = EveryN(0)
    assert not any(never.due() for _ in range(10))
    three = EveryN(3)
    due = [i for i in range(1, 11) if three.due()]
    assert due == [1, 4, 7, 10]
    one = EveryN(1)
    assert all(one.due() for _ in range(5))


# --- StageTimes -------------------------------------------------------------------------------------


def test_stage_medians() -> None:
    st = StageTimes()
    assert st.medians() == {}
    for i, infer in enumerate([30.0, 10.0, 20.0, 1000.0, 25.0]):
        st.add({"pre": 1.0 + i, "infer": infer}, finished=100.0 + i)
    assert st.medians() == {"pre": 3.0, "infer": 25.0}
    assert set(st.medians()) <= set(STAGES)


def test_stage_window() -> None:
    st = StageTimes(window=3)
    for ms in (100.0, 1.0, 2.0, 3.0):
        st.add({"infer": ms}, finished=ms)
    assert st.medians() == {"infer": 2.0}


def test_fps() -> None:
    st = StageTimes()
    assert st.fps(now=100.0) == 0.0
    for i in range(11):  # 11 frames, 0.5 s apart: 2 fps
        st.add({"infer": 1.0}, finished=100.0 + 0.5 * i)
    assert st.fps(now=105.0) == pytest.approx(2.0)
    # Only the last `span` seconds count: 3 frames in the last 1 s.
    assert st.fps(now=105.0, span=1.0) == pytest.approx(2.0)
    # Long after the last frame: nothing recent.
    assert st.fps(now=200.0) == 0.0
    # One recent frame is no rate.
    assert st.fps(now=115.0) == 0.0
    st.add({"infer": 1.0}, finished=105.25)
    assert st.fps(now=105.25, span=0.3) == pytest.approx(1 / 0.25)


# --- watch.text_heatmap -----------------------------------------------------------------------------


def test_text_heatmap_shape_and_shades() -> None:
    rng = np.random.default_rng(3)
    cam = rng.normal(0, 1, (7, 7)).astype(np.float32)
    rows = text_heatmap(cam)
    assert len(rows) == 7 and all(len(r) == 14 for r in rows)
    assert set("".join(rows)) <= set(SHADES)
    hi = np.unravel_index(np.argmax(cam), cam.shape)
    lo = np.unravel_index(np.argmin(cam), cam.shape)
    assert rows[hi[0]][2 * hi[1] : 2 * hi[1] + 2] == "██"
    assert rows[lo[0]][2 * lo[1] : 2 * lo[1] + 2] == "  "
    # Each cell is two copies of one shade, and brighter cells never get lighter shades.
    levels = np.array([[SHADES.index(r[2 * x]) for x in range(7)] for r in rows])
    assert all(r[2 * x] == r[2 * x + 1] for r in rows for x in range(7))
    order = np.argsort(cam, axis=None)
    assert np.all(np.diff(levels.reshape(-1)[order]) >= 0)
    assert len(set(levels.reshape(-1))) == len(SHADES)  # a normal spread uses every shade


def test_text_heatmap_flat_and_wide() -> None:
    assert text_heatmap(np.full((3, 5), 2.5, np.float32)) == [" " * 10] * 3
    rows = text_heatmap(np.array([[0.0, 1.0, 2.0, 3.0, 4.0]]))
    assert rows == ["  ░░▒▒▓▓██"]


# --- watch.check_result and result_line ----------------------------------------------------------


def payload(**over: Any) -> dict[str, Any]:
    cam = np.arange(49, dtype=np.float32).reshape(7, 7) / 10
    raw = result_payload(
        device="cam-7",
        boot="ab12cd34",
        seq=42,
        ts=1_764_000_000.5,
        model="mobilenet_v2_1.0_224_quant",
        top=[(282, "tabby, tabby cat", 0.61234), (286, "Egyptian cat", 0.2), (283, "tiger cat", 0.05)],
        cam_id=282,
        cam_label="tabby, tabby cat",
        cam=cam,
        timing_ms={"capture_age": 3.0, "pre": 2.0, "infer": 40.0, "cam": 1.0, "total": 46.04},
    )
    obj = json.loads(raw)
    obj.update(over)
    return obj


def test_check_result_accepts_a_real_payload() -> None:
    obj = payload()
    assert check_result(obj) is obj
    assert decode_cam(obj["cam"]).shape == (7, 7)


def test_result_line() -> None:
    line = result_line(payload())
    assert line == "cam-7 #42  tabby 0.61 | Egyptian cat 0.20 | tiger cat 0.05  46.0 ms"
    assert "tabby cat" not in line
    # Without timings there is no latency.
    obj = payload()
    del obj["timing_ms"]
    assert result_line(obj) == "cam-7 #42  tabby 0.61 | Egyptian cat 0.20 | tiger cat 0.05"


def without(key: str) -> dict[str, Any]:
    obj = payload()
    del obj[key]
    return obj


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([payload()], "not a JSON object"),
        ("text", "not a JSON object"),
        (payload(v=2), "contract version 2"),
        (without("v"), "contract version None"),
        (without("top"), "'top'"),
        (without("device"), "'device'"),
        (without("seq"), "'seq'"),
        (without("cam"), "'cam'"),
        (payload(top="tabby"), "'top' is not a list"),
        (payload(top=[]), "'top' is not a list"),
        (payload(top=[{"label": "tabby"}]), "'top' is not a list"),
        (payload(top=[{"label": 282, "score": 0.5}]), "'top' is not a list"),
        (payload(top=[{"label": "tabby", "score": "0.5"}]), "'top' is not a list"),
        (payload(top=[["tabby", 0.5]]), "'top' is not a list"),
        (payload(cam="iVBORw0KGgo="), "'cam' is not an object"),
        (payload(cam=None), "'cam' is not an object"),
    ],
)
def test_check_result_rejects(obj: Any, needle: str) -> None:
    with pytest.raises(PayloadError) as info:
        check_result(obj)
    assert needle in str(info.value)


# --- broker.host_port: the one HOST:PORT rule of --broker and --listen ---------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("h", ("h", 1883)),
        ("h:1884", ("h", 1884)),
        ("broker.lan:65535", ("broker.lan", 65535)),
        ("10.0.0.2:1", ("10.0.0.2", 1)),
        ("[::1]:1884", ("::1", 1884)),
        ("[::1]", ("::1", 1883)),
        ("::1", ("::1", 1883)),
        ("fe80::2", ("fe80::2", 1883)),
        ("[fe80::2%eth0]:1884", ("fe80::2%eth0", 1884)),
        ("h:080", ("h", 80)),
    ],
)
def test_host_port_with_a_default_port(text: str, expected: tuple[str, int]) -> None:
    assert host_port(text, "--broker", 1883) == expected


def test_host_port_default_port() -> None:
    assert host_port("h", "--broker", 8883) == ("h", 8883)
    assert host_port("h:1999", "--broker", 8883) == ("h", 1999)
    assert host_port("[::1]:8080", "--listen") == ("::1", 8080)
    assert host_port("0.0.0.0:8080", "--listen") == ("0.0.0.0", 8080)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("h:0", "port '0'"),
        ("h:65536", "port '65536'"),
        ("host:99999", "port '99999' is not 1..65535"),
        ("h:x", "port 'x'"),
        ("h:", "port ''"),
        ("host:", "port ''"),
        ("h:-1", "port '-1'"),
        ("h:+80", "port '+80'"),
        ("h:\u00b3", "port '\u00b3'"),  # a digit to str.isdigit, not to int()
        ("h:" + "9" * 5000, "is not 1..65535"),  # int() of so many digits raises
        (":1883", "no host"),
        (":80", "no host"),
        ("", "no host"),
        ("[::1", "unclosed"),
        ("[::1]1883", "[HOST]:PORT"),
        ("[]:1883", "no host"),
        ("[::1]:x", "port 'x'"),
        ("[host]:80", "'host' in brackets is not an IPv6 address"),
        ("a:b:c", "more than one ':'; an IPv6 address goes in brackets"),
        ("a b:80", "space"),
        ("mqtt://h:1883", "a URL; give the host and port alone"),
        ("a" * 64 + ":1883", "not a host name (label too long)"),  # was a traceback in paho's thread
        ("a..lan:1883", "not a host name"),
        (".lan:1883", "not a host name"),
    ],
)
@pytest.mark.parametrize("flag", ["--broker", "--listen"])
def test_host_port_errors(text: str, needle: str, flag: str) -> None:
    with pytest.raises(EdgecamError) as info:
        host_port(text, flag, 1883 if flag == "--broker" else None)
    msg = str(info.value)
    assert msg.startswith(f"{flag} ") and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize(("text", "needle"), [
    ("host", "no port; expected HOST:PORT"),
    ("[::1]", "no port"),
    ("::1", "an IPv6 address goes in brackets, then its port"),
])
def test_a_listen_address_needs_its_port(text: str, needle: str) -> None:
    with pytest.raises(EdgecamError, match=re.escape(needle)):
        host_port(text, "--listen")


@pytest.mark.parametrize(("flag", "value"), [("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "inf"),
                                             ("--count", "-3")])
def test_watch_refuses_a_bad_timeout_or_count_with_one_line(flag: str, value: str) -> None:
    # Before: --timeout -1 returned at once with exit 0, having watched nothing.
    proc = run_cli("watch", "--broker", "127.0.0.1:1", flag, value, timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_error_line(proc, flag)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """watch's `edgecam: error:` lines; the rest of stderr may only be its retry lines."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith(("edgecam: error: ", "watch: cannot reach ", "watching ")) for line in lines), lines
    return [line for line in lines if line.startswith("edgecam: error: ")]


@pytest.mark.parametrize("count", [[], ["--count", "2"]])
def test_watch_that_never_connected_says_so_and_fails(count: list[str]) -> None:
    # Before: exit 0 after --timeout with no broker at all, as if it had watched a quiet fleet.
    port = free_port()  # nothing listens on it
    proc = run_cli("watch", "--broker", f"127.0.0.1:{port}", "--timeout", "2", *count, timeout=60)
    assert proc.returncode == EXIT_NEVER_CONNECTED == 3, (proc.returncode, proc.stderr)
    assert error_lines(proc) == [f"edgecam: error: never connected to 127.0.0.1:{port} in 2 s"], proc.stderr
    assert "watch: cannot reach" in proc.stderr and "Connection refused" in proc.stderr


def test_watch_refuses_a_name_no_lookup_takes_with_one_line() -> None:
    # Before: paho's thread died with UnicodeError ('label too long') and a traceback; exit 3 after --timeout.
    proc = run_cli("watch", "--broker", "a" * 64 + ".lan:1883", "--timeout", "30", timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_error_line(proc, "--broker", "not a host name")


def test_watch_that_connected_and_timed_out(broker: Broker) -> None:
    # A quiet fleet on a broker it reached: a watch without --count did its job (0)...
    proc = run_cli("watch", "--broker", broker.address, "--timeout", "3", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == [] and f"watching edgecam/+/ on {broker.address}" in proc.stderr
    # ...one that wanted results did not get them (1).
    proc = run_cli("watch", "--broker", broker.address, "--timeout", "3", "--count", "1", timeout=60)
    assert proc.returncode == EXIT_TOO_FEW == 1, proc.stderr
    assert error_lines(proc) == ["edgecam: error: 0 results in 3 s, expected 1"]


def test_watch_help_says_what_each_exit_status_means() -> None:
    proc = run_cli("watch", "--help", timeout=60)
    assert proc.returncode == 0
    statuses = proc.stdout[proc.stdout.index("exit status:"):]
    for code in ("0", "1", "2", "3"):
        assert f"\n  {code}  " in statuses, statuses
    assert "without ever connecting" in statuses
