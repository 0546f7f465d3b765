"""The one device-id rule, prefix rule and topic builder of contract v1, and every consumer applying them:
the configuration (`config check` and `run`), the dashboard's fleet state, Home Assistant discovery and
`edgecam watch`."""

from __future__ import annotations

import pytest
from conftest import IMAGES, one_error_line, run_cli

from edgecam.contract import (
    CMD_REPLY,
    DEVICE_ID_RULE,
    MAX_DEVICE_ID,
    RESULT,
    TOPIC_NAMES,
    ContractError,
    check_device_id,
    check_prefix,
    device_id_from,
    is_device_id,
    parse_topic,
    topic,
)
from edgecam.core.errors import EdgecamError
from edgecam.device import config, discovery
from edgecam.web.fleet import Fleet

# Ids a user has tried, or an attacker would: spaces, control characters, topic wildcards, bidi overrides,
# non-ASCII letters, a leading dot or dash, one over the length, and the 70,000 characters of issue 15.
BAD_IDS = ["", "my cam", "cam\x07", "cam\n", "\x1b[2J", "a/b", "cam+", "#", " cam", "cam ", "-cam", ".cam", "_cam",
           "caméra", "cam\u202e", "d" * (MAX_DEVICE_ID + 1), "x" * 70_000]
GOOD_IDS = ["a", "7", "cam-1", "A.b_c-9", "pi.kitchen", "d" * MAX_DEVICE_ID]


@pytest.mark.parametrize("dev", GOOD_IDS)
def test_device_ids_the_rule_allows(dev: str) -> None:
    assert is_device_id(dev) and check_device_id(dev) == dev


@pytest.mark.parametrize("dev", BAD_IDS)
def test_device_ids_the_rule_refuses_in_one_line(dev: str) -> None:
    assert not is_device_id(dev)
    with pytest.raises(ContractError) as info:
        check_device_id(dev, "device_id")
    msg = str(info.value)
    assert msg.startswith("device_id: ") and DEVICE_ID_RULE in msg
    assert "\n" not in msg and "\x1b" not in msg and len(msg) < 200  # the id is shown escaped and cut


@pytest.mark.parametrize(
    ("name", "expected"),
    [("greenhouse-3", "greenhouse-3"), ("my cam", "my-cam"), ("Küche", "K-che"), ("-pi_4.", "pi_4."),
     ("h" * 300, "h" * MAX_DEVICE_ID), ("", "edgecam"), ("---", "edgecam"), ("ラズパイ", "edgecam")],
)
def test_a_device_id_from_any_host_name(name: str, expected: str) -> None:
    assert device_id_from(name) == expected
    assert is_device_id(device_id_from(name))


def test_the_default_device_id_keeps_the_rule() -> None:
    assert is_device_id(config.default_device_id())


def test_topics_are_built_and_read_back_by_one_rule() -> None:
    for name in TOPIC_NAMES:
        t = topic("site9", "cam-1", name)
        assert t == f"site9/cam-1/{name}"
        assert parse_topic("site9", t) == ("cam-1", name)
    assert topic("edgecam", "+", RESULT) == "edgecam/+/result"
    assert parse_topic("edgecam", "edgecam/cam-1/cmd/reply") == ("cam-1", CMD_REPLY)
    for other in ("other/cam-1/result", "edgecam/cam-1/unknown", "edgecam/cam-1", "edgecam", "/edgecam/cam-1/result",
                  "edgecam/cam-1/result/x"):
        assert parse_topic("edgecam", other) is None, other
    # The device level comes back as found: its reader decides (the fleet counts it as bad).
    assert parse_topic("edgecam", "edgecam/my cam/status") == ("my cam", "status")
    with pytest.raises(ValueError):
        topic("edgecam", "cam-1", "results")


@pytest.mark.parametrize("prefix", ["", "a/b", "+", "a#", " site", "site\x1b", "p" * 129])
def test_prefixes_the_rule_refuses(prefix: str) -> None:
    with pytest.raises(ContractError, match=r"^mqtt\.prefix: "):
        check_prefix(prefix, "mqtt.prefix")


@pytest.mark.parametrize("prefix", ["edgecam", "site 9", "usine-été", "p" * 128])
def test_prefixes_the_rule_allows(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["", "/ha", "ha/", "a//b", "h+", "#", " ha", "ha\x1b", "h" * 70_000])
def test_the_discovery_prefix_is_checked_by_the_same_rule(prefix: str) -> None:
    cfg = config.Config()
    cfg.homeassistant.prefix = prefix
    with pytest.raises(EdgecamError, match=r"^homeassistant\.prefix: "):
        config.validate(cfg)


def test_the_discovery_prefix_may_have_levels() -> None:
    cfg = config.Config()
    cfg.homeassistant.prefix = "site 9/homeassistant"
    config.validate(cfg)


# -- the consumers ----------------------------------------------------------------------------


@pytest.mark.parametrize("dev", BAD_IDS[1:])
def test_config_refuses_what_the_rule_refuses(dev: str) -> None:
    cfg = config.Config()
    cfg.device_id = dev
    with pytest.raises(EdgecamError) as info:
        config.validate(cfg)
    assert str(info.value).startswith("device_id: ")


@pytest.mark.parametrize("dev", GOOD_IDS)
def test_config_takes_what_the_rule_takes(dev: str) -> None:
    cfg = config.Config()
    cfg.device_id = dev
    config.validate(cfg)


@pytest.mark.parametrize(
    ("how", "dev"),
    [("file", "my cam"), ("file", "cam\\u0007"), ("file", "d" * 65), ("env", "x" * 70_000), ("flag", "my cam"),
     ("env", "cam\x1b]0;pwned\x07")],
)
def test_config_check_and_run_refuse_a_bad_device_id_in_one_line(tmp_path, how: str, dev: str) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "edgecam.toml"
    conf.write_text(f'device_id = "{dev}"\n' if how == "file" else "", encoding="utf-8")
    env = {"EDGECAM_DEVICE_ID": dev} if how == "env" else {}
    flag = ["--device-id", dev] if how == "flag" else []
    for command in (["config", "check"], ["run", "--source", str(IMAGES), "--once", "--no-mqtt"]):
        proc = run_cli(*command, "--config", conf, *flag, env=env, timeout=120)
        assert proc.returncode == 2, (command, proc.stderr[-300:])
        line = one_error_line(proc, "device_id", DEVICE_ID_RULE)
        assert len(line) < 300 and "\x1b" not in line and "\x07" not in line
        assert proc.stdout == ""  # run made nothing: no result went anywhere before the refusal


def test_fleet_drops_messages_of_what_the_rule_refuses() -> None:
    fleet = Fleet()
    for dev in ("my cam", "d" * 65, "-cam", "cam\u202e"):
        assert fleet.ingest(f"edgecam/{dev}/status", b"online", 0.0) is None
    assert fleet.devices == {} and fleet.bad == 4
    assert fleet.ingest("edgecam/" + "d" * 64 + "/status", b"online", 0.0) == "d" * 64


def test_discovery_refuses_what_the_rule_refuses() -> None:
    with pytest.raises(ContractError):
        discovery.configs("edgecam", "my cam", "m")
    topics = [t for t, _ in discovery.configs("edgecam", "pi.kitchen_2", "m")]
    assert all(" " not in t and t.split("/")[2] == "edgecam_pi_dkitchen__2" for t in topics)


@pytest.mark.parametrize(
    ("args", "needles"),
    [(["--device", "my cam"], ["--device", DEVICE_ID_RULE]), (["--device", "x" * 70_000], ["--device"]),
     (["--device", "+"], ["--device"]), (["--prefix", "a/b"], ["--prefix"]), (["--prefix", ""], ["--prefix"])],
)
def test_watch_refuses_what_the_rule_refuses(args: list[str], needles: list[str]) -> None:
    proc = run_cli("watch", "--broker", "127.0.0.1:1", *args, "--timeout", "5", timeout=60)
    assert proc.returncode == 2
    one_error_line(proc, *needles)
