"""The daemon's configuration: one TOML file, then EDGECAM_<SECTION>_<KEY> variables, then flags.

Every key is declared once below with its type, default and allowed range; loading
walks that declaration, so an unknown key, a wrong type or a value out of range is
reported as one line naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecam.broker import BrokerOptions, read_password
from edgecam.contract import check_device_id, check_prefix, device_id_from
from edgecam.core.errors import EdgecamError, shown
from edgecam.core.preprocess import Normalization, normalization

DEFAULT_PATH = Path("/etc/edgecam/edgecam.toml")
ENV_PREFIX = "EDGECAM_"


def _f(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices, "secret": secret})


@dataclass
class SourceConfig:
    kind: str = _f("auto", "where frames come from", choices=("auto", "picamera2", "opencv", "folder"))
    uri: str = _f("", "opencv: device index, /dev/videoN, rtsp:// or http:// URL, or video file; folder: a directory")
    repeat: bool = _f(True, "folder and video file: start again at the end")
    fps: float = _f(0.0, "folder and video file: play at this rate like a camera (0: hand every frame to the loop)",
                    lo=0, hi=240)
    width: int = _f(640, "capture width asked of a camera (picamera2: the overlay stream)", lo=16, hi=8192)
    height: int = _f(480, "capture height asked of a camera", lo=16, hi=8192)
    read_timeout: float = _f(5.0, "seconds without a frame before the source counts as failed", lo=0.1, hi=600)
    max_pixels: int = _f(25_000_000, "folder: images whose header claims more pixels are skipped undecoded",
                         lo=1, hi=1_000_000_000)


@dataclass
class ModelConfig:
    name: str = _f("", "manifest model name or .tflite path (empty: the manifest's default)")
    labels: str = _f("", "labels file (empty: the model's own)")
    threads: int = _f(2, "interpreter threads", lo=1, hi=64)
    crop: bool = _f(False, "centre-crop frames to the model's aspect instead of resizing the whole frame")
    input_mean: str = _f("", "input normalisation in pixel units: the model sees (pixel - mean) / std; one value or "
                         "one per channel, as a string (\"127.5\" or \"123.7,116.3,103.5\"; empty: the manifest's, "
                         "else the model's metadata, else raw pixels for quantized inputs, 127.5 for float)")
    input_std: str = _f("", "input normalisation's std, with input_mean (same form)")


@dataclass
class LoopConfig:
    max_fps: float = _f(0.0, "at most this many frames a second (0: as fast as the model runs)", lo=0, hi=1000)
    publish: str = _f("every", "publish every result, or only when the top-1 changes", choices=("every", "change"))
    change_delta: float = _f(0.1, "publish=change: also publish when the top-1 score moves by more than this",
                             lo=0, hi=1)
    heartbeat: float = _f(30.0, "publish=change: publish at least every this many seconds", lo=0.1, hi=86400)
    overlay_every: int = _f(0, "publish an overlay JPEG every N published results (0: never)", lo=0, hi=1_000_000)
    overlay_width: int = _f(320, "overlay width in pixels", lo=16, hi=4096)
    overlay_height: int = _f(240, "overlay height in pixels", lo=16, hi=4096)
    overlay_style: str = _f("blend", "overlay style", choices=("blend", "dim"))
    jpeg_quality: int = _f(80, "overlay JPEG quality", lo=1, hi=100)
    heatmap_width: int = _f(0, "width of the published map (0: the raw map, e.g. 7)", lo=0, hi=64)
    heatmap_height: int = _f(0, "height of the published map (0: the raw map)", lo=0, hi=64)
    stats_interval: float = _f(10.0, "seconds between retained stats messages", lo=1, hi=3600)


@dataclass
class MqttConfig:
    enabled: bool = _f(True, "publish to a broker (false: print results as JSON lines on stdout)")
    host: str = _f("localhost", "broker host name or address")
    port: int = _f(1883, "broker port", lo=1, hi=65535)
    prefix: str = _f("edgecam", "topic prefix: topics are <prefix>/<device_id>/...")
    qos: int = _f(1, "QoS of results", lo=0, hi=1)
    keepalive: int = _f(30, "keepalive seconds", lo=5, hi=3600)
    protocol: str = _f("3.1.1", "MQTT protocol version", choices=("3.1.1", "5"))
    reconnect_min: float = _f(1.0, "first reconnect delay, seconds (doubles up to reconnect_max)", lo=0.1, hi=600)
    reconnect_max: float = _f(60.0, "longest reconnect delay, seconds", lo=1, hi=3600)
    max_queued: int = _f(1000, "messages held in memory when the spool file cannot be written", lo=1, hi=1_000_000)
    shutdown_timeout: float = _f(10.0, "seconds to wait for the broker's acknowledgements at exit", lo=0, hi=600)
    username: str = _f("", "broker user name")
    password: str = _f("", "broker password (better: password_file or EDGECAM_MQTT_PASSWORD)", secret=True)
    password_file: str = _f("", "file holding the broker password")
    tls: bool = _f(False, "connect with TLS (1.2 or newer)")
    ca_file: str = _f("", "CA certificate file for TLS (empty: the system's CAs)")
    cert_file: str = _f("", "client certificate for TLS")
    key_file: str = _f("", "client key for TLS")


@dataclass
class SpoolConfig:
    enabled: bool = _f(True, "keep undelivered results on disk (false: in memory only, up to mqtt.max_queued)")
    dir: str = _f("", "directory of the spool file (empty: $STATE_DIRECTORY, else /var/lib/edgecam if writable, "
                  "else ~/.local/state/edgecam)")
    max_mb: float = _f(64.0, "results kept at most, in MB", lo=0.01, hi=100_000)
    max_age_hours: float = _f(168.0, "results older than this are dropped, in hours", lo=0.001, hi=87_600)
    policy: str = _f("drop_oldest", "when full: drop the oldest results or refuse new ones",
                     choices=("drop_oldest", "drop_newest"))
    overlays: bool = _f(False, "keep undelivered overlays too (else they are sent only while connected)")
    overlay_mb: float = _f(8.0, "overlays kept at most, in MB", lo=0.01, hi=100_000)


@dataclass
class CommandsConfig:
    enabled: str = _f("auto", "commands on <prefix>/<device>/cmd: auto = only when the broker connection is "
                      "authenticated (mqtt.username set)", choices=("auto", "on", "off"))
    rate: float = _f(2.0, "commands a second allowed on average (bursts of 10); the rest are dropped",
                     lo=0.1, hi=1000)


@dataclass
class HomeAssistantConfig:
    discovery: bool = _f(False, "publish Home Assistant MQTT discovery messages (sensors and an image entity)")
    prefix: str = _f("homeassistant", "Home Assistant's discovery prefix")


@dataclass
class Config:
    device_id: str = _f("", "device id in topics and the client id: 1 to 64 of A-Z a-z 0-9 _ . -, starting with a "
                        "letter or digit (empty: the host name, made to fit)")
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)

    @property
    def device(self) -> str:
        return self.device_id or default_device_id()


SECTIONS = ("source", "model", "loop", "mqtt", "spool", "commands", "homeassistant")


def default_device_id() -> str:
    # The short host name, made to fit the device-id rule (a host name may be longer, or not ASCII).
    return device_id_from(socket.gethostname().split(".")[0])


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj) if f.name not in SECTIONS}


def coerce(value: Any, f: dataclasses.Field, where: str, text: bool = False) -> Any:
    """The value as the field's type (parsed first when it comes as `text`), or one clear error naming `where`."""
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    meta = f.metadata
    if text and isinstance(value, str) and kind is not str:
        value = _parse_text(value, kind, where)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise EdgecamError(f"{where}: {shown(value)} is out of range ({_range(meta)})") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EdgecamError(f"{where}: expected {_type_name(kind)}, got {_type_name(type(value))} {shown(value)}")
    if kind in (int, float):
        lo, hi = meta["lo"], meta["hi"]
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value != value:
            raise EdgecamError(f"{where}: {shown(value)} is out of range ({_range(meta)})")
    if meta["choices"] and value not in meta["choices"]:
        raise EdgecamError(f"{where}: {shown(value)} is not one of {', '.join(meta['choices'])}")
    return value


def _parse_text(text: str, kind: type, where: str) -> Any:
    s = text.strip()
    if kind is bool:
        if s.lower() in ("1", "true", "yes", "on"):
            return True
        if s.lower() in ("0", "false", "no", "off"):
            return False
        raise EdgecamError(f"{where}: expected true or false, got {shown(text)}")
    try:
        return kind(s)
    except ValueError:
        raise EdgecamError(f"{where}: expected {_type_name(kind)}, got {shown(text)}") from None


def _type_name(kind: type) -> str:
    return {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}.get(
        kind, kind.__name__
    )


def _range(meta: Mapping[str, Any]) -> str:
    return f"{_num(meta['lo'])}..{_num(meta['hi'])}"


def _num(v: float | None) -> str:
    return "" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


def _apply(target: Any, values: Mapping[str, Any], path: str, section: str | None) -> None:
    known = _fields(target)
    for key, value in values.items():
        if key not in known:
            where = f"{path}: [{section}]" if section else path
            raise EdgecamError(f"{where}: unknown key {shown(key)}; known keys: {', '.join(known)}")
        setattr(target, key, coerce(value, known[key], f"{path}: {section + '.' if section else ''}{key}"))


def from_toml(text: str, where: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgecamError(f"{where}: not valid TOML: {' '.join(str(exc).split())[:200]}") from None
    except (ValueError, RecursionError) as exc:
        # Python's own limits, met inside the TOML parser: a number of over 4,300 digits, deep nesting.
        raise EdgecamError(f"{where}: not usable TOML: {' '.join(str(exc).split())[:200]}") from None
    cfg = Config()
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise EdgecamError(f"{where}: [{key}] must be a table, got {shown(value)}")
            _apply(getattr(cfg, key), value, where, key)
        elif key in _fields(cfg):
            top[key] = value
        else:
            raise EdgecamError(
                f"{where}: unknown key {shown(key)}; top level takes device_id and the tables [{'], ['.join(SECTIONS)}]"
            )
    _apply(cfg, top, where, None)
    return cfg


def env_name(section: str | None, key: str) -> str:
    return ENV_PREFIX + (f"{section}_{key}" if section else key).upper()


def apply_env(cfg: Config, environ: Mapping[str, str]) -> None:
    """EDGECAM_DEVICE_ID, EDGECAM_MQTT_HOST, EDGECAM_LOOP_MAX_FPS, ... override the file."""
    for section, target in [(None, cfg), *((s, getattr(cfg, s)) for s in SECTIONS)]:
        for key, f in _fields(target).items():
            name = env_name(section, key)
            if name in environ:
                setattr(target, key, coerce(environ[name], f, name, text=True))


def set_value(cfg: Config, dotted: str, value: Any, where: str) -> None:
    """One override from a flag: `mqtt.host`, `loop.max_fps`, `device_id`."""
    section, _, key = dotted.rpartition(".")
    target = getattr(cfg, section) if section else cfg
    setattr(target, key, coerce(value, _fields(target)[key], where, text=True))


def load(path: Path | None, environ: Mapping[str, str] | None = None) -> tuple[Config, str]:
    """The file (or the defaults when no file was named and the default path is absent), then the environment.

    Returns the configuration and a word on where it came from.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG", "").strip():
        path = Path(environ[ENV_PREFIX + "CONFIG"])
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
        origin = str(path)
    except FileNotFoundError:
        if explicit:
            raise EdgecamError(f"{path}: config file not found") from None
        text, origin = "", f"defaults ({path} not found)"
    except UnicodeDecodeError:
        raise EdgecamError(f"{path}: config file is not UTF-8 text") from None
    except OSError as exc:
        raise EdgecamError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    cfg = from_toml(text, str(path))
    apply_env(cfg, environ)
    return cfg, origin


def stated_normalization(model: ModelConfig) -> Normalization | None:
    """model.input_mean / input_std as a normalisation, or None when neither is set."""
    if not model.input_mean and not model.input_std:
        return None
    return normalization(model.input_mean or None, model.input_std or None, "config", "model.input_mean/input_std")


def validate(cfg: Config) -> None:
    """Checks across keys, once every layer is applied."""
    stated_normalization(cfg.model)
    m = cfg.mqtt
    if m.reconnect_min > m.reconnect_max:
        raise EdgecamError(f"mqtt.reconnect_min {m.reconnect_min} is above mqtt.reconnect_max {m.reconnect_max}")
    if m.password and m.password_file:
        raise EdgecamError("mqtt.password and mqtt.password_file are both set; keep one")
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        value = getattr(m, key)
        try:
            found = not value or Path(value).is_file()
        except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte
            why = getattr(exc, "strerror", None) or exc
            raise EdgecamError(f"mqtt.{key}: {shown(value)}: not a usable path ({why})") from None
        if not found:
            raise EdgecamError(f"mqtt.{key}: {shown(value, 200)}: no such file")
    if bool(m.cert_file) != bool(m.key_file):
        raise EdgecamError("mqtt.cert_file and mqtt.key_file go together")
    ha = cfg.homeassistant.prefix
    if not ha or any(c in ha for c in "+#") or ha.strip() != ha or ha.startswith("/") or ha.endswith("/"):
        raise EdgecamError(f"homeassistant.prefix: {shown(ha)} is not a usable topic prefix")
    check_device_id(cfg.device, "device_id")
    check_prefix(m.prefix, "mqtt.prefix")
    lp = cfg.loop
    if bool(lp.heatmap_width) != bool(lp.heatmap_height):
        raise EdgecamError("loop.heatmap_width and loop.heatmap_height go together (both 0 for the raw map)")
    if cfg.source.kind == "folder" and not cfg.source.uri:
        raise EdgecamError("source.uri: the folder source needs a directory")
    if cfg.source.kind == "opencv" and not cfg.source.uri:
        raise EdgecamError("source.uri: the opencv source needs a device, URL or file")


def password(cfg: MqttConfig) -> str | None:
    if cfg.password_file:
        return read_password(cfg.password_file, "mqtt.password_file")
    return cfg.password or None


def broker_options(cfg: MqttConfig, device: str, secret: str | None) -> BrokerOptions:
    """How the daemon connects: the [mqtt] settings, with the device id as the client id."""
    return BrokerOptions(
        host=cfg.host, port=cfg.port, client_id=device, username=cfg.username, password=secret, tls=cfg.tls,
        ca_file=cfg.ca_file, cert_file=cfg.cert_file, key_file=cfg.key_file, protocol=cfg.protocol,
        keepalive=cfg.keepalive, reconnect_min=cfg.reconnect_min, reconnect_max=cfg.reconnect_max,
    )


def to_toml(cfg: Config, redact: bool = True) -> str:
    """The effective configuration as TOML, secrets shown as "<redacted>"."""

    def lines(target: Any) -> list[str]:
        out = []
        for key, f in _fields(target).items():
            v = getattr(target, key)
            if redact and f.metadata["secret"] and v:
                v = "<redacted>"
            out.append(f"{key} = {to_toml_value(v)}")
        return out

    # The comment runs to the end of the line: an id that is not plainly printable is shown escaped.
    effective = cfg.device if cfg.device.isprintable() else to_toml_value(cfg.device)
    parts = [f"device_id = {to_toml_value(cfg.device_id)}  # effective: {effective}"]
    for section in SECTIONS:
        parts += ["", f"[{section}]", *lines(getattr(cfg, section))]
    return "\n".join(parts) + "\n"


def describe_keys() -> str:
    """Every key with its default and meaning: the commented default config file."""
    out = []
    cfg = Config()
    for section, target in [(None, cfg), *((s, getattr(cfg, s)) for s in SECTIONS)]:
        if section:
            out += ["", f"[{section}]"]
        for key, f in _fields(target).items():
            out.append(f"# {f.metadata['help']}  (env {env_name(section, key)})")
            out.append(f"# {key} = {to_toml_value(getattr(target, key))}")
    return "\n".join(out).lstrip("\n") + "\n"


def to_toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # JSON's string escapes are TOML's, control characters included; TOML also bars a raw DEL.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(v)
