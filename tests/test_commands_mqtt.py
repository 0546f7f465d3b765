"""Commands on <prefix>/<device>/cmd through a real Mosquitto, and their replies on cmd/reply."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from broker import Broker, Recorder, publish
from conftest import IMAGES, run_cli, wait_until

from edgecam.contract import decode_cam

pytestmark = pytest.mark.usefixtures("model_cache")

ON = {"EDGECAM_COMMANDS_ENABLED": "on"}


@pytest.fixture
def cat_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "cat"
    folder.mkdir()
    (folder / "cat.bmp").write_bytes((IMAGES / "cat.bmp").read_bytes())
    return folder


def replies(rec: Recorder) -> list[dict[str, Any]]:
    return [json.loads(p) for p in rec.on("reply")]


def reply_to(rec: Recorder, rid: Any, timeout: float = 15) -> dict[str, Any]:
    assert rec.wait_for(lambda m: any(r.get("id") == rid for r in _replies(m)), timeout), replies(rec)
    return next(r for r in replies(rec) if r.get("id") == rid)


def _replies(messages: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in messages if t.endswith("/cmd/reply")]


def counted(messages: list[tuple[str, bytes, bool]], at_least: int) -> dict[str, int] | None:
    """The command counts of the latest stats message, once they account for at_least commands:
    waiting on the daemon's own account, not on a fixed time (a flood can take seconds to arrive)."""
    for t, p, _ in reversed(messages):
        if t.endswith("/stats"):
            c = json.loads(p)["commands"]
            return c if c["accepted"] + c["rejected"] + c["dropped"] >= at_least else None
    return None


def start(daemons, broker: Broker, folder: Path, device: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    rec = Recorder(broker.port, f"edgecam/{device}/#")
    d = daemons("--source", folder, "--source-fps", "4", "--broker", broker.address, "--device-id", device,
                env=env)
    assert rec.wait_for(lambda m: any(t.endswith("/result") for t, _, _ in m), 60), d.log()
    return d, rec


def test_commands_do_what_they_say(broker: Broker, daemons, cat_folder: Path) -> None:
    d, rec = start(daemons, broker, cat_folder, "dev-q", ON)
    cmd = "edgecam/dev-q/cmd"

    publish(broker.port, cmd, json.dumps({"cmd": "ping", "id": "p1"}))
    pong = reply_to(rec, "p1")
    assert pong["ok"] and pong["device"] == "dev-q" and pong["boot"] == rec.results()[0]["boot"]

    # The CAM of the true class next to the predicted one: tabby on a picture called Egyptian cat.
    publish(broker.port, cmd, json.dumps({"cmd": "explain", "class": "tabby", "frames": 2, "id": 7}))
    ok = reply_to(rec, 7)
    assert ok["ok"] and ok["class"] == 282 and ok["label"].startswith("tabby") and ok["frames"] == 2
    assert rec.wait_for(lambda m: sum("cams" in json.loads(p) for t, p, _ in m if t.endswith("/result")) >= 2, 20)
    with_extra = [r for r in rec.results() if "cams" in r]
    # Exactly the next two results, then back to the top-1 only.
    assert [r["seq"] for r in with_extra] == [ok["seq"] + 1, ok["seq"] + 2]
    ref = run_cli("explain", "--json", "--class", "tabby", cat_folder / "cat.bmp")
    ref_map = np.array(json.loads(ref.stdout)["cams"][1]["map"], np.float32)
    for r in with_extra:
        assert r["cam"]["label"] == "Egyptian cat"
        extra = r["cams"][0]
        assert extra["id"] == 282
        step = (extra["max"] - extra["min"]) / 255
        assert np.max(np.abs(decode_cam(extra) - ref_map)) <= step / 2 + 2e-5

    assert rec.on("overlay") == []
    publish(broker.port, cmd, json.dumps({"cmd": "snapshot", "id": "s"}))
    assert reply_to(rec, "s")["ok"]
    assert rec.wait_for(lambda m: any(t.endswith("/overlay") for t, _, _ in m), 20)
    assert rec.on("overlay")[0][:2] == b"\xff\xd8"

    publish(broker.port, cmd, json.dumps({"cmd": "set", "publish": "change", "heartbeat": 600, "id": "c"}))
    changed = reply_to(rec, "c")
    assert changed["ok"] and changed["publish"] == "change" and changed["heartbeat"] == 600
    # After the change, the first decision publishes; the same picture again and again is no change.
    after = lambda: [r["seq"] for r in rec.results() if r["seq"] > changed["seq"]]  # noqa: E731
    assert rec.wait_for(lambda _m: bool(after()), 20)
    time.sleep(4)  # 16 frames at 4 fps
    assert after() == [changed["seq"] + 1], after()

    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    rec.close()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"cmd": "reboot", "id": 1}).encode(), "unknown command"),
        (json.dumps({"cmd": "explain", "class": "unicorn", "id": 1}).encode(), "not a label"),
        (json.dumps({"cmd": "explain", "class": 281, "frames": 0, "id": 1}).encode(), "frames"),
        (json.dumps({"cmd": "set", "max_fps": -3, "id": 1}).encode(), "out of range"),
        (json.dumps({"cmd": "ping", "id": 1, "pad": "x" * 5000}).encode(), "over 4096"),
    ],
)
def test_bad_commands_get_an_error_reply(broker: Broker, daemons, cat_folder: Path, payload: bytes,
                                         error: str) -> None:
    d, rec = start(daemons, broker, cat_folder, "dev-e", ON)
    publish(broker.port, "edgecam/dev-e/cmd", payload)
    assert rec.wait_for(lambda m: bool(_replies(m)), 15), d.log()
    (bad,) = replies(rec)
    assert bad["ok"] is False and error in bad["error"], bad
    # The loop carries on.
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 2, 20)
    assert d.proc.poll() is None and "Traceback" not in d.log()
    rec.close()


def test_a_flood_of_commands_is_dropped_not_served(broker: Broker, daemons, cat_folder: Path) -> None:
    d, rec = start(daemons, broker, cat_folder, "dev-f", ON)
    from broker import paho_client

    client = paho_client(broker.port)
    # QoS 1, so the broker may not thin the flood out itself (QoS 0 it may drop under load).
    began = time.monotonic()
    sent = [client.publish("edgecam/dev-f/cmd", json.dumps({"cmd": "ping", "id": i}), qos=1) for i in range(300)]
    for info in sent:
        info.wait_for_publish(30)
    assert all(info.is_published() for info in sent)
    client.disconnect()
    client.loop_stop()

    # Wait for the daemon's own account of all 300 rather than a fixed time: on a busy machine
    # the flood can take seconds to arrive, and the bucket refills (2 a second) meanwhile.
    assert rec.wait_for(lambda m: counted(m, 300) is not None, 30), d.log()
    took = time.monotonic() - began  # an upper bound on how long the bucket had to refill
    seen = counted(rec.messages, 300)
    assert seen is not None and seen["accepted"] + seen["dropped"] == 300 and seen["rejected"] == 0, seen
    # A burst of 10, then 2 a second.
    assert 10 <= seen["accepted"] <= 10 + 2 * took + 1, (seen, took)
    # Every accepted ping is answered, and only those.
    assert rec.wait_for(lambda m: len(_replies(m)) >= seen["accepted"], 15), (len(replies(rec)), seen, d.log())
    time.sleep(0.5)
    assert sorted(r["id"] for r in replies(rec)) == sorted(set(r["id"] for r in replies(rec)))
    assert len(replies(rec)) == seen["accepted"] and all(r["ok"] for r in replies(rec))
    count = len(rec.results())
    assert rec.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/result")]) >= count + 3, 20)
    assert d.log().count("commands: too many") <= 2 + took // 10  # one line per 10 s of flood at most
    rec.close()


def test_commands_are_off_without_authentication(broker: Broker, daemons, cat_folder: Path) -> None:
    d, rec = start(daemons, broker, cat_folder, "dev-n")
    publish(broker.port, "edgecam/dev-n/cmd", json.dumps({"cmd": "ping", "id": "x"}))
    time.sleep(2)
    assert replies(rec) == []
    assert "commands: on" not in d.log()
    rec.close()


def test_a_new_max_fps_takes_effect_at_once(broker: Broker, daemons, cat_folder: Path) -> None:
    """A rate of 0.001 fps timed the next frame 1000 s away; a later rate of 10 must not wait for it."""
    d, rec = start(daemons, broker, cat_folder, "dev-r", {**ON, "EDGECAM_LOOP_STATS_INTERVAL": "1"})
    cmd = "edgecam/dev-r/cmd"
    publish(broker.port, cmd, json.dumps({"cmd": "set", "max_fps": 0.001, "id": "slow"}))
    slow = reply_to(rec, "slow")
    assert slow["ok"] and slow["max_fps"] == 0.001
    # Slow now: at most the one frame the new rate allows (1000 s after the last), and stats go on meanwhile.
    n_stats = len(rec.on("stats"))
    assert rec.wait_for(lambda _m: len(rec.on("stats")) >= n_stats + 3, 20), d.log()
    slow_results = [r["seq"] for r in rec.results() if r["seq"] > slow["seq"]]
    assert len(slow_results) <= 1, slow_results

    publish(broker.port, cmd, json.dumps({"cmd": "set", "max_fps": 10, "id": "fast"}))
    fast = reply_to(rec, "fast")
    assert fast["ok"] and fast["max_fps"] == 10
    assert rec.wait_for(lambda _m: len([r for r in rec.results() if r["seq"] > fast["seq"]]) >= 3, 20), d.log()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    rec.close()


def test_explain_is_bounded_in_classes_per_result(broker: Broker, daemons, cat_folder: Path) -> None:
    from edgecam.device.commands import MAX_CLASSES

    env = {**ON, "EDGECAM_LOOP_HEATMAP_WIDTH": "64", "EDGECAM_LOOP_HEATMAP_HEIGHT": "64",
           "EDGECAM_COMMANDS_RATE": "100"}
    d, rec = start(daemons, broker, cat_folder, "dev-x", env)
    cmd = "edgecam/dev-x/cmd"
    for i in range(MAX_CLASSES + 2):
        publish(broker.port, cmd, json.dumps({"cmd": "explain", "class": 300 + i, "frames": 1000, "id": i}))
    answers = [reply_to(rec, i) for i in range(MAX_CLASSES + 2)]
    assert [a["ok"] for a in answers] == [True] * MAX_CLASSES + [False, False], answers
    assert f"{MAX_CLASSES} classes" in answers[-1]["error"]
    # A class already asked for may be asked again (its frames renewed) without counting twice.
    publish(broker.port, cmd, json.dumps({"cmd": "explain", "class": 300, "frames": 5, "id": "again"}))
    assert reply_to(rec, "again")["ok"]
    last = max(a["seq"] for a in answers if a["ok"])
    assert rec.wait_for(lambda _m: any(r["seq"] > last + 1 for r in rec.results()), 20), d.log()
    raw = [p for p in rec.on("result") if json.loads(p)["seq"] > last + 1]
    for payload in raw:
        r = json.loads(payload)
        assert len(r["cams"]) <= MAX_CLASSES
        assert len(payload) < 64 * 1024, len(payload)  # the dashboard's limit for one message
    assert {c["id"] for c in json.loads(raw[-1])["cams"]} == set(range(300, 300 + MAX_CLASSES))
    rec.close()


def test_commands_beyond_the_inbox_are_refused_with_a_reply(broker: Broker, daemons) -> None:
    """With the loop away (a camera that gives no frame: it waits read_timeout for one), commands pile up;
    beyond the inbox's 64 each gets an error reply, and every one of them is answered exactly once."""
    from broker import paho_client

    from edgecam.device.commands import INBOX

    rec = Recorder(broker.port, "edgecam/dev-i/#")
    d = daemons("--source", "/dev/video9", "--broker", broker.address, "--device-id", "dev-i",
                env={**ON, "EDGECAM_SOURCE_READ_TIMEOUT": "10", "EDGECAM_COMMANDS_RATE": "1000"})
    assert wait_until(lambda: "commands: on" in d.log(), 60, 0.1), d.log()
    # Answered by the loop between two waits for a frame: the flood then lands within one wait.
    assert rec.wait_for(lambda m: any(t.endswith("/status") for t, _, _ in m), 30), d.log()
    publish(broker.port, "edgecam/dev-i/cmd", json.dumps({"cmd": "snapshot", "id": "probe"}))
    assert reply_to(rec, "probe", 60)["ok"]
    # Paced at half the rate limit (1000 a second, bursts of 10), so it passes most; those it drops
    # are counted as dropped.
    n = 3 * INBOX
    client = paho_client(broker.port)
    slot = time.monotonic()
    for i in range(n):
        slot += 0.002
        time.sleep(max(0.0, slot - time.monotonic()))
        client.publish("edgecam/dev-i/cmd", json.dumps({"cmd": "snapshot", "id": i}), qos=1).wait_for_publish(30)
    client.disconnect()
    client.loop_stop()

    assert rec.wait_for(lambda m: counted(m, n + 1) is not None, 60), d.log()
    seen = counted(rec.messages, n + 1)
    assert seen is not None and seen["accepted"] + seen["rejected"] + seen["dropped"] == n + 1, seen
    answers = [a for a in replies(rec) if a["id"] != "probe"]
    ids = [a["id"] for a in answers]
    # Each command not dropped by the rate limit is answered exactly once; none is lost silently.
    assert len(ids) == len(set(ids)) == n - seen["dropped"], (len(ids), seen)
    busy = [a for a in answers if not a["ok"]]
    assert busy and all("busy" in a["error"] and str(INBOX) in a["error"] for a in busy), (seen, d.log()[-3000:])
    assert len(busy) == seen["rejected"] and len(answers) - len(busy) == seen["accepted"] - 1
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(30) == 0, d.log()
    rec.close()



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_commands_waiting_at_a_stop_or_reload_are_answered(tmp_path: Path, daemons, sig: signal.Signals) -> None:
    """Commands the broker delivered to the device but the loop had not reached when it was told to
    stop (or to reload) were dropped with the inbox: no reply, as if never sent. Each gets one now,
    as do those arriving while the spool drains. The broker's log says what it delivered."""
    from broker import paho_client

    b = Broker(tmp_path / "b", extra_conf="log_type all").start()
    try:
        rec = Recorder(b.port, "edgecam/dev-w/#")
        # A camera that gives no frame: the loop answers commands between one-second waits for one.
        d = daemons("--source", "/dev/video9", "--broker", b.address, "--device-id", "dev-w",
                    env={**ON, "EDGECAM_SOURCE_READ_TIMEOUT": "10", "EDGECAM_COMMANDS_RATE": "1000"})
        assert rec.wait_for(lambda m: any(t.endswith("/status") for t, _, _ in m), 60), d.log()
        # Until the device has subscribed (a command before that is not delivered to it).
        for _ in range(60):
            publish(b.port, "edgecam/dev-w/cmd", json.dumps({"cmd": "ping", "id": "probe"}))
            if rec.wait_for(lambda m: any(r.get("id") == "probe" for r in _replies(m)), 1):
                break
        assert any(r.get("id") == "probe" for r in replies(rec)), d.log()
        probes = sum(1 for line in b.log.read_text(errors="replace").splitlines()
                     if "Sending PUBLISH to dev-w" in line and "'edgecam/dev-w/cmd'" in line)
        client = paho_client(b.port)
        for i in range(8):  # within the burst the rate limit allows
            client.publish("edgecam/dev-w/cmd", json.dumps({"cmd": "ping", "id": i}), qos=1).wait_for_publish(30)

        def delivered() -> int:
            return sum(1 for line in b.log.read_text(errors="replace").splitlines()
                       if "Sending PUBLISH to dev-w" in line and "'edgecam/dev-w/cmd'" in line) - probes

        assert wait_until(lambda: delivered() == 8, 30, 0.001), b.log.read_text()[-2000:]
        d.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            assert d.wait(60) == 0, d.log()
        answered = lambda: {r["id"] for r in replies(rec)} - {"probe"}  # noqa: E731
        # Answered in any case: carried out before the loop ended, or refused saying why.
        assert rec.wait_for(lambda _m: answered() == set(range(8)), 30), (replies(rec), d.log()[-2000:])
        refused = [r for r in replies(rec) if not r["ok"]]
        assert all("not carried out" in r["error"] for r in refused), refused
        client.loop_stop()
        client.disconnect()
    finally:
        b.stop()
