"""The configuration: TOML file < EDGECAM_* environment < flags, one clear line per mistake, secrets redacted."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, one_error_line, run_cli

from edgecam.device import config
from edgecam.device.config import Config, EdgecamError

WHERE = "/etc/edgecam/test.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No EDGECAM_* configuration variable from the caller's shell leaks into a test or its subprocesses."""
    keys = {"EDGECAM_CONFIG"}
    cfg = Config()
    for section, target in [(None, cfg), *((s, getattr(cfg, s)) for s in config.SECTIONS)]:
        keys |= {config.env_name(section, f.name) for f in dataclasses.fields(target) if f.name not in config.SECTIONS}
    for name in keys & set(os.environ):
        monkeypatch.delenv(name)


def toml_error(text: str, *needles: str) -> str:
    """from_toml refuses `text` with one line naming the file and every needle."""
    with pytest.raises(EdgecamError) as info:
        config.from_toml(text, WHERE)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(WHERE + ": "), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def toml_str(s: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(s)


def check_ok(*args: str | Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`edgecam config check ARGS`, expected to succeed; its stdout parsed as TOML."""
    proc = run_cli("config", "check", *args, env=env, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc, tomllib.loads(proc.stdout)


# --- from_toml ------------------------------------------------------------------------------------


def test_empty_file_gives_the_defaults() -> None:
    assert config.from_toml("", WHERE) == Config()
    assert config.from_toml("# only a comment\n\n[mqtt]\n", WHERE) == Config()
    cfg = Config()
    assert (cfg.source.kind, cfg.mqtt.port, cfg.mqtt.host, cfg.loop.publish) == ("auto", 1883, "localhost", "every")


def test_values_are_read_into_their_sections() -> None:
    cfg = config.from_toml(
        'device_id = "cam-7"\n[source]\nkind = "folder"\nuri = "/pics"\nrepeat = false\n'
        '[model]\nthreads = 4\n[loop]\npublish = "change"\n[mqtt]\nhost = "broker.lan"\nport = 8883\n',
        WHERE,
    )
    assert cfg.device_id == "cam-7" and cfg.device == "cam-7"
    assert (cfg.source.kind, cfg.source.uri, cfg.source.repeat) == ("folder", "/pics", False)
    assert cfg.model.threads == 4
    assert cfg.loop.publish == "change"
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.lan", 8883)
    # Untouched keys keep their defaults.
    assert cfg.loop.max_fps == 0.0 and cfg.mqtt.prefix == "edgecam"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        # unknown keys
        ('colour = "red"', ["'colour'", "device_id", "[mqtt]"]),
        ('[mqtt]\nhots = "x"', ["[mqtt]", "'hots'", "known keys", "host", "port", "key_file"]),
        ("[source.extra]\nx = 1", ["[source]", "'extra'", "known keys"]),
        # wrong types
        ('[mqtt]\nport = "1883"', ["mqtt.port", "whole number", "'1883'"]),
        ("[mqtt]\nhost = 5", ["mqtt.host", "a string", "5"]),
        ("[mqtt]\nport = true", ["mqtt.port", "whole number"]),
        ("[model]\nthreads = 2.0", ["model.threads", "whole number"]),
        ("[loop]\nmax_fps = true", ["loop.max_fps", "a number"]),
        ('[source]\nrepeat = "yes"', ["source.repeat", "true or false"]),
        ("device_id = 7", ["device_id", "a string"]),
        # out of range
        ("[mqtt]\nport = 0", ["mqtt.port", "out of range", "1..65535"]),
        ("[mqtt]\nport = 70000", ["mqtt.port", "70000", "1..65535"]),
        ("[loop]\njpeg_quality = 101", ["loop.jpeg_quality", "101", "1..100"]),
        ("[loop]\nmax_fps = -1", ["loop.max_fps", "out of range"]),
        ("[loop]\nmax_fps = -0.5", ["loop.max_fps", "out of range"]),
        ("[loop]\nmax_fps = nan", ["loop.max_fps", "out of range"]),
        ("[loop]\nmax_fps = inf", ["loop.max_fps", "out of range"]),
        # bad choice
        ('[source]\nkind = "cam"', ["source.kind", "'cam'", "picamera2", "folder"]),
        ('[loop]\npublish = "Every"', ["loop.publish", "'Every'", "change"]),
        # a table given as a scalar
        ('mqtt = "localhost"', ["[mqtt]", "table"]),
        ("source = 5", ["[source]", "table"]),
        # not TOML at all
        ("[mqtt\nhost = 1", ["not valid TOML"]),
        ("[mqtt]\nhost = localhost", ["not valid TOML"]),
    ],
)
def test_bad_file_gives_one_line_naming_file_and_key(text: str, needles: list[str]) -> None:
    toml_error(text, *needles)


def test_ints_are_accepted_for_float_keys() -> None:
    cfg = config.from_toml("[loop]\nmax_fps = 2\nheartbeat = 5\n[source]\nfps = 1\n", WHERE)
    assert cfg.loop.max_fps == 2.0 and type(cfg.loop.max_fps) is float
    assert cfg.loop.heartbeat == 5.0 and type(cfg.loop.heartbeat) is float
    assert cfg.source.fps == 1.0 and type(cfg.source.fps) is float


def test_toml_strings_are_not_parsed_as_numbers() -> None:
    toml_error('[loop]\nmax_fps = "2.5"', "loop.max_fps", "a number", "'2.5'")
    toml_error('[mqtt]\nenabled = "false"', "mqtt.enabled", "true or false")


# --- the environment ------------------------------------------------------------------------------


def test_env_values_are_parsed() -> None:
    cfg = Config()
    config.apply_env(
        cfg,
        {
            "EDGECAM_MQTT_PORT": "1884",
            "EDGECAM_LOOP_MAX_FPS": "2.5",
            "EDGECAM_SOURCE_REPEAT": "false",
            "EDGECAM_DEVICE_ID": "cam-7",
            "EDGECAM_MODEL_CROP": " yes ",
            "EDGECAM_MQTT_HOST": "envhost",
        },
    )
    assert cfg.mqtt.port == 1884 and type(cfg.mqtt.port) is int
    assert cfg.loop.max_fps == 2.5
    assert cfg.source.repeat is False
    assert cfg.device_id == "cam-7"
    assert cfg.model.crop is True
    assert cfg.mqtt.host == "envhost"


@pytest.mark.parametrize(
    ("name", "value", "needles"),
    [
        ("EDGECAM_MQTT_PORT", "x", ["whole number", "'x'"]),
        ("EDGECAM_MQTT_PORT", "0", ["out of range"]),
        ("EDGECAM_MQTT_PORT", "1883.5", ["whole number"]),
        ("EDGECAM_SOURCE_REPEAT", "maybe", ["true or false", "'maybe'"]),
        ("EDGECAM_LOOP_MAX_FPS", "fast", ["a number"]),
        ("EDGECAM_LOOP_PUBLISH", "sometimes", ["'sometimes'", "every, change"]),
    ],
)
def test_bad_env_value_names_the_variable(name: str, value: str, needles: list[str]) -> None:
    with pytest.raises(EdgecamError) as info:
        config.apply_env(Config(), {name: value})
    msg = str(info.value)
    assert msg.startswith(name + ": "), msg
    for needle in needles:
        assert needle in msg, msg


def test_unrelated_edgecam_variables_are_ignored() -> None:
    cfg = Config()
    config.apply_env(
        cfg, {"EDGECAM_MODEL_DIR": "/tmp/models", "EDGECAM_RUNTIME": "tflite", "EDGECAM_THREADS": "x", "HOME": "/"}
    )
    assert cfg == Config()


# --- load() ---------------------------------------------------------------------------------------


def test_load_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(EdgecamError, match="config file not found") as info:
        config.load(missing, {})
    assert str(missing) in str(info.value)


def test_load_without_a_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg, origin = config.load(None, {})
    assert cfg == Config()
    assert "defaults" in origin and "absent.toml" in origin


def test_load_reads_the_default_path_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edgecam.toml"
    path.write_text('[mqtt]\nhost = "defaulthost"\n', encoding="utf-8")
    monkeypatch.setattr(config, "DEFAULT_PATH", path)
    cfg, origin = config.load(None, {})
    assert cfg.mqtt.host == "defaulthost" and origin == str(path)


def test_load_edgecam_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    path = tmp_path / "from-env.toml"
    path.write_text('[mqtt]\nhost = "filehost"\nport = 1999\n', encoding="utf-8")
    cfg, origin = config.load(None, {"EDGECAM_CONFIG": str(path), "EDGECAM_MQTT_PORT": "2000"})
    assert origin == str(path)
    assert cfg.mqtt.host == "filehost"
    assert cfg.mqtt.port == 2000  # the environment beats the file
    # A named file that is missing is an error, not the defaults.
    with pytest.raises(EdgecamError, match="config file not found"):
        config.load(None, {"EDGECAM_CONFIG": str(tmp_path / "gone.toml")})
    # An explicit path wins over EDGECAM_CONFIG.
    other = tmp_path / "other.toml"
    other.write_text('[mqtt]\nhost = "otherhost"\n', encoding="utf-8")
    cfg, origin = config.load(other, {"EDGECAM_CONFIG": str(path)})
    assert (cfg.mqtt.host, origin) == ("otherhost", str(other))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[mqtt]\nport = 0\n", encoding="utf-8")
    with pytest.raises(EdgecamError, match=re.escape(f"{path}: mqtt.port: 0 is out of range")):
        config.load(path, {})
    path.write_bytes(b"[mqtt]\nhost = \"\xff\xfe\"\n")
    with pytest.raises(EdgecamError, match="not UTF-8"):
        config.load(path, {})


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "edgecam.toml"
    path.write_text('[mqtt]\nhost = "filehost"\nport = 1885\n[loop]\nmax_fps = 1\n', encoding="utf-8")
    env = {"EDGECAM_MQTT_HOST": "envhost"}

    _, out = check_ok("-c", path, env=env)
    assert out["mqtt"]["host"] == "envhost" and out["mqtt"]["port"] == 1885
    assert out["loop"]["max_fps"] == 1.0

    _, out = check_ok("-c", path, "--max-fps", "3", env=env)
    assert out["mqtt"]["host"] == "envhost"
    assert out["loop"]["max_fps"] == 3.0

    _, out = check_ok("-c", path, "--max-fps", "3", "--broker", "flaghost:1999", env=env)
    assert (out["mqtt"]["host"], out["mqtt"]["port"]) == ("flaghost", 1999)
    assert out["loop"]["max_fps"] == 3.0

    # --broker without a port keeps the port from the file.
    _, out = check_ok("-c", path, "--broker", "flaghost", env=env)
    assert (out["mqtt"]["host"], out["mqtt"]["port"]) == ("flaghost", 1885)


def test_other_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "edgecam.toml"
    path.write_text('device_id = "filecam"\n[model]\nthreads = 3\n', encoding="utf-8")
    pics = tmp_path / "pics"
    pics.mkdir()
    _, out = check_ok(
        "-c", path, "--device-id", "flagcam", "--threads", "5", "--source", pics, "--once",
        "--publish", "change", "--no-mqtt", "--prefix", "site-a", "--overlay-every", "4", "--source-fps", "2",
    )
    assert out["device_id"] == "flagcam"
    assert out["model"]["threads"] == 5
    assert out["source"] == {**out["source"], "kind": "folder", "uri": str(pics), "repeat": False, "fps": 2.0}
    assert out["loop"]["publish"] == "change" and out["loop"]["overlay_every"] == 4
    assert out["mqtt"]["enabled"] is False and out["mqtt"]["prefix"] == "site-a"


# --- validate() -----------------------------------------------------------------------------------


def valid() -> Config:
    cfg = Config()
    cfg.device_id = "cam-1"
    return cfg


def test_defaults_validate() -> None:
    config.validate(valid())
    config.validate(Config())  # the host name as device id


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda c, t: setattr(c.mqtt, "reconnect_min", 30.0) or setattr(c.mqtt, "reconnect_max", 10.0),
         ["reconnect_min", "reconnect_max"]),
        (lambda c, t: setattr(c.mqtt, "password", "pw") or setattr(c.mqtt, "password_file", str(t / "pw")),
         ["password", "password_file", "both"]),
        (lambda c, t: setattr(c.mqtt, "password_file", str(t / "missing-pw")), ["mqtt.password_file", "missing-pw"]),
        (lambda c, t: setattr(c.mqtt, "ca_file", str(t / "missing-ca.pem")), ["mqtt.ca_file", "missing-ca.pem"]),
        (lambda c, t: setattr(c.mqtt, "cert_file", str(t / "pw")), ["cert_file", "key_file"]),
        (lambda c, t: setattr(c.mqtt, "key_file", str(t / "pw")), ["cert_file", "key_file"]),
        (lambda c, t: setattr(c, "device_id", "a/b"), ["device_id", "'a/b'"]),
        (lambda c, t: setattr(c, "device_id", "cam+"), ["device_id", "'cam+'"]),
        (lambda c, t: setattr(c, "device_id", "#"), ["device_id"]),
        (lambda c, t: setattr(c, "device_id", " cam"), ["device_id"]),
        (lambda c, t: setattr(c.mqtt, "prefix", "site/a"), ["mqtt.prefix", "'site/a'"]),
        (lambda c, t: setattr(c.mqtt, "prefix", "+"), ["mqtt.prefix"]),
        (lambda c, t: setattr(c.mqtt, "prefix", "a#"), ["mqtt.prefix"]),
        (lambda c, t: setattr(c.mqtt, "prefix", ""), ["mqtt.prefix"]),
        (lambda c, t: setattr(c.loop, "heatmap_width", 7), ["heatmap_width", "heatmap_height"]),
        (lambda c, t: setattr(c.loop, "heatmap_height", 7), ["heatmap_width", "heatmap_height"]),
        (lambda c, t: setattr(c.source, "kind", "folder"), ["source.uri", "folder"]),
        (lambda c, t: setattr(c.source, "kind", "opencv"), ["source.uri", "opencv"]),
    ],
)
def test_validate_rejects(tmp_path: Path, change: Any, needles: list[str]) -> None:
    (tmp_path / "pw").write_text("secret\n", encoding="utf-8")
    cfg = valid()
    change(cfg, tmp_path)
    with pytest.raises(EdgecamError) as info:
        config.validate(cfg)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_validate_accepts_consistent_settings(tmp_path: Path) -> None:
    for name in ("pw", "ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    cfg = valid()
    cfg.mqtt.password_file = str(tmp_path / "pw")
    cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file = (
        str(tmp_path / n) for n in ("ca.pem", "cert.pem", "key.pem")
    )
    cfg.mqtt.reconnect_min = cfg.mqtt.reconnect_max = 5.0
    cfg.loop.heatmap_width, cfg.loop.heatmap_height = 14, 7
    cfg.source.kind, cfg.source.uri = "folder", str(tmp_path)
    config.validate(cfg)
    assert config.password(cfg.mqtt) == "x"


# --- to_toml, redaction and the round trip ------------------------------------------------------


def test_to_toml_redacts_the_password() -> None:
    cfg = valid()
    cfg.mqtt.password = "s3cret-pw"
    text = config.to_toml(cfg)
    assert "s3cret-pw" not in text
    assert tomllib.loads(text)["mqtt"]["password"] == "<redacted>"
    assert tomllib.loads(config.to_toml(cfg, redact=False))["mqtt"]["password"] == "s3cret-pw"
    # An unset password is shown as unset, not as "<redacted>".
    assert tomllib.loads(config.to_toml(valid()))["mqtt"]["password"] == ""


def round_trip_file(tmp_path: Path) -> Path:
    """A config with a non-default value for nearly every key, strings with quotes, backslashes and non-ASCII."""
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    s = toml_str
    uri = '/data/pics "best" \\ ünïcödé'
    user = 'ed "the" user\\'
    text = f"""
device_id = "cam-7"
[source]
kind = "folder"
uri = {s(uri)}
repeat = false
fps = 2.5
width = 1280
height = 720
read_timeout = 1.5
[model]
name = "mobilenet_v1_0.25_128_quant"
labels = {s("/opt/labels 'x'.txt")}
threads = 4
crop = true
[loop]
max_fps = 7.5
publish = "change"
change_delta = 0.05
heartbeat = 60
overlay_every = 5
overlay_width = 640
overlay_height = 480
overlay_style = "dim"
jpeg_quality = 90
heatmap_width = 14
heatmap_height = 14
stats_interval = 30
[mqtt]
enabled = false
host = "broker.lan"
port = 8883
prefix = "site-a"
qos = 0
keepalive = 60
protocol = "5"
reconnect_min = 2
reconnect_max = 120
max_queued = 50
shutdown_timeout = 0
username = {s(user)}
tls = true
ca_file = {s(str(tmp_path / "ca.pem"))}
cert_file = {s(str(tmp_path / "cert.pem"))}
key_file = {s(str(tmp_path / "key.pem"))}
"""
    path = tmp_path / "full.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_config_check_round_trips_and_redacts(tmp_path: Path) -> None:
    path = round_trip_file(tmp_path)
    secret = "hunter2-secret"
    proc, parsed = check_ok("-c", path, env={"EDGECAM_MQTT_PASSWORD": secret})
    assert secret not in proc.stdout and secret not in proc.stderr
    assert "<redacted>" in proc.stdout
    assert parsed["mqtt"]["password"] == "<redacted>"
    assert str(path) in proc.stdout.splitlines()[0]  # the comment names where it came from

    expected = config.from_toml(path.read_text(encoding="utf-8"), str(path))
    assert expected != Config()
    expected.mqtt.password = "<redacted>"
    again = config.from_toml(proc.stdout, "config check output")
    assert again == expected
    # Every key is printed, in its section.
    for section in config.SECTIONS:
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section))}
        assert set(parsed[section]) == keys
    assert set(parsed) == {"device_id", *config.SECTIONS}


def test_config_check_shows_the_effective_device_id(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    proc, parsed = check_ok("-c", path)
    assert parsed["device_id"] == ""
    line = next(x for x in proc.stdout.splitlines() if x.startswith("device_id"))
    assert f"# effective: {config.default_device_id()}" in line
    assert config.from_toml(proc.stdout, "out") == Config()


def test_to_toml_is_valid_toml_with_control_characters() -> None:
    cfg = valid()
    config.apply_env(cfg, {"EDGECAM_MQTT_USERNAME": "user\r", "EDGECAM_SOURCE_URI": "a\x1bb"})
    assert config.from_toml(config.to_toml(cfg), "out") == cfg


# --- config default -------------------------------------------------------------------------------


def test_config_default_is_all_comments_and_every_key() -> None:
    proc = run_cli("config", "default", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    headers = [f"[{s}]" for s in config.SECTIONS]
    for line in lines:
        assert line == "" or line.startswith("#") or line in headers, line
    # Each section header once, in order; each key's default under its own section, with its variable.
    assert [x for x in lines if x in headers] == headers
    cfg = Config()
    section_of_line = {}
    current = None
    for i, line in enumerate(lines):
        if line in headers:
            current = line[1:-1]
        section_of_line[i] = current
    for section, target in [(None, cfg), *((s, getattr(cfg, s)) for s in config.SECTIONS)]:
        for f in dataclasses.fields(target):
            if f.name in config.SECTIONS:
                continue
            want = f"# {f.name} = {config.to_toml_value(getattr(target, f.name))}"
            where = [i for i, x in enumerate(lines) if x == want and section_of_line[i] == section]
            assert len(where) == 1, (section, want)
            assert config.env_name(section, f.name) in lines[where[0] - 1]

    # As printed it is valid TOML holding nothing but empty tables: the defaults.
    assert config.from_toml(proc.stdout, "default") == Config()

    # Uncommenting every `# key = value` line gives the defaults, spelled out.
    pattern = re.compile(r"^# ([a-z_]+ = .*)$")
    uncommented = "\n".join(m.group(1) if (m := pattern.match(x)) else x for x in lines)
    n_keys = sum(1 for x in uncommented.splitlines() if re.match(r"^[a-z_]+ = ", x))
    n_fields = 1 + sum(len(dataclasses.fields(getattr(cfg, s))) for s in config.SECTIONS)
    assert n_keys == n_fields
    assert config.from_toml(uncommented, "uncommented") == Config()


# --- the CLI's error lines ------------------------------------------------------------------------


def test_cli_missing_config_file(tmp_path: Path) -> None:
    proc = run_cli("config", "check", "-c", tmp_path / "missing.toml", timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    one_error_line(proc, "missing.toml", "not found")


@pytest.mark.parametrize("host", ["a" * 64, "a..lan", "with space", ""])
def test_cli_a_broker_host_no_lookup_takes(tmp_path: Path, host: str) -> None:
    # Before: accepted; the daemon's paho thread then died on it (UnicodeError: label too long), a
    # traceback, and the daemon never connected.
    path = tmp_path / "host.toml"
    path.write_text(f'[mqtt]\nhost = "{host}"\n', encoding="utf-8")
    proc = run_cli("config", "check", "-c", path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    one_error_line(proc, "mqtt.host")


def test_cli_bad_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[mqtt]\nhots = "x"\n', encoding="utf-8")
    proc = run_cli("config", "check", "-c", path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    one_error_line(proc, str(path), "[mqtt]", "'hots'", "known keys")


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        ([], {"EDGECAM_LOOP_MAX_FPS": "abc"}, ["EDGECAM_LOOP_MAX_FPS", "'abc'"]),
        ([], {"EDGECAM_SOURCE_REPEAT": "maybe"}, ["EDGECAM_SOURCE_REPEAT", "true or false"]),
        (["--threads", "-1"], {}, ["--threads", "out of range", "0..64"]),
        (["--max-fps", "-1"], {}, ["--max-fps", "out of range"]),
        (["--broker", "host:notaport"], {}, ["--broker", "host:notaport", "notaport"]),
        (["--broker", "host:0"], {}, ["--broker", "1..65535"]),
        (["--prefix", "a/b"], {}, ["mqtt.prefix", "'a/b'"]),
        (["--source", ""], {}, ["--source", "empty"]),
        (["--broker", ""], {}, ["--broker", "no host"]),
        ([], {"EDGECAM_MQTT_RECONNECT_MIN": "90"}, ["reconnect_min", "reconnect_max"]),
    ],
)
def test_cli_error_lines(tmp_path: Path, args: list[str], env: dict[str, str], needles: list[str]) -> None:
    path = tmp_path / "edgecam.toml"
    path.write_text("", encoding="utf-8")
    proc = run_cli("config", "check", "-c", path, *args, env=env, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    one_error_line(proc, *needles)


# --- the reference page, and the ranges it promises -----------------------------------------------


def test_configuration_page_is_what_the_declarations_make() -> None:
    proc = run_cli("config", "reference", timeout=60)
    assert proc.returncode == 0, proc.stderr
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == proc.stdout, (
        "docs/configuration.md is stale; regenerate it with: edgecam config reference > docs/configuration.md"
    )


def test_configuration_page_names_every_key_env_and_flag() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key, (env, flag) in {
        "device_id": ("EDGECAM_DEVICE_ID", "--device-id"),
        "max_fps": ("EDGECAM_LOOP_MAX_FPS", "--max-fps"),
        "repeat": ("EDGECAM_SOURCE_REPEAT", "--once"),
        "host": ("EDGECAM_MQTT_HOST", "--broker"),
        "password": ("EDGECAM_MQTT_PASSWORD", ""),
    }.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |") and env in line)
        assert flag in row, row
    assert "`max_fps`, `publish`, `change_delta`, `heartbeat`, `overlay_every`." in page


# Written out by hand from the documented ranges, not read from the declarations: a range declared
# wrongly in config.py (stats_interval from 0, say) fails here.
PINNED_RANGES: dict[str, tuple[float, float]] = {
    "source.fps": (0, 240), "source.width": (16, 8192), "source.height": (16, 8192),
    "source.read_timeout": (0.1, 600), "source.max_pixels": (1, 1_000_000_000), "model.threads": (0, 64),
    "loop.max_fps": (0, 1000), "loop.change_delta": (0, 1), "loop.heartbeat": (0.1, 86400),
    "loop.overlay_every": (0, 1_000_000), "loop.overlay_width": (16, 4096), "loop.overlay_height": (16, 4096),
    "loop.jpeg_quality": (1, 100), "loop.heatmap_width": (0, 64), "loop.heatmap_height": (0, 64),
    "loop.stats_interval": (1, 3600),
    "mqtt.port": (1, 65535), "mqtt.qos": (0, 1), "mqtt.keepalive": (5, 3600), "mqtt.reconnect_min": (0.1, 600),
    "mqtt.reconnect_max": (1, 3600), "mqtt.max_queued": (1, 1_000_000), "mqtt.shutdown_timeout": (0, 600),
    "spool.max_mb": (0.01, 100_000), "spool.max_age_hours": (0.001, 87_600), "spool.overlay_mb": (0.01, 100_000),
    "commands.rate": (0.1, 1000),
}
PINNED_CHOICES: dict[str, tuple[str, ...]] = {
    "source.kind": ("auto", "picamera2", "opencv", "folder"), "loop.publish": ("every", "change"),
    "loop.overlay_style": ("blend", "dim"), "mqtt.protocol": ("3.1.1", "5"),
    "spool.policy": ("drop_oldest", "drop_newest"), "commands.enabled": ("auto", "on", "off"),
}
WHOLE = {"source.width", "source.height", "source.max_pixels", "model.threads", "loop.overlay_every",
         "loop.overlay_width", "loop.overlay_height", "loop.jpeg_quality", "loop.heatmap_width",
         "loop.heatmap_height", "mqtt.port", "mqtt.qos", "mqtt.keepalive", "mqtt.max_queued"}


def _one(key: str, value: Any) -> str:
    section, name = key.split(".")
    return f"[{section}]\n{name} = {config.to_toml_value(value)}\n"


@pytest.mark.parametrize("key", sorted(PINNED_RANGES))
def test_documented_ranges_hold(key: str) -> None:
    lo, hi = PINNED_RANGES[key]
    step = 1 if key in WHOLE else min(0.001, lo / 10 if lo else 0.001)
    kind = int if key in WHOLE else float
    section, name = key.split(".")
    for ok in (lo, hi):
        cfg = config.from_toml(_one(key, kind(ok)), "pinned")
        assert getattr(getattr(cfg, section), name) == ok
    for bad in (lo - step, hi + step):
        with pytest.raises(EdgecamError, match="out of range"):
            config.from_toml(_one(key, kind(bad)), "pinned")


@pytest.mark.parametrize("key", sorted(PINNED_CHOICES))
def test_documented_choices_hold(key: str) -> None:
    section, name = key.split(".")
    for choice in PINNED_CHOICES[key]:
        assert getattr(getattr(config.from_toml(_one(key, choice), "pinned"), section), name) == choice
    with pytest.raises(EdgecamError, match="is not one of"):
        config.from_toml(_one(key, "banana"), "pinned")


def test_every_numeric_and_choice_key_is_pinned() -> None:
    """A new key with a range or choices gets its documented bounds pinned above."""
    for s in config.settings():
        meta = s.field.metadata
        if meta["choices"]:
            assert s.dotted in PINNED_CHOICES, s.dotted
        elif s.kind in (int, float):
            assert s.dotted in PINNED_RANGES, s.dotted
            assert (s.dotted in WHOLE) == (s.kind is int), s.dotted
