"""The daemon's configuration: one TOML file, then EDGECAM_<SECTION>_<KEY> variables, then flags.

Every setting is declared once below (`setting(...)`): its type, default, allowed range or
choices, help text, whether it is secret, its command-line flag if it has one, and whether a
`set` command may change it at run time. Its environment name follows from where it sits.
Loading walks these declarations, so an unknown key, a wrong type or a value out of range is
one line naming the key and where it came from; the flags of `run` and `config check`, the
command-settable table, `config default` and docs/configuration.md are derived from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecam.broker import BrokerOptions, host_port, host_problem, read_password
from edgecam.contract import check_device_id, check_prefix, device_id_from
from edgecam.core.errors import EdgecamError, shown
from edgecam.core.normalization import Normalization, normalization

DEFAULT_PATH = Path("/etc/edgecam/edgecam.toml")
ENV_PREFIX = "EDGECAM_"


@dataclass(frozen=True)
class Flag:
    """A setting's command-line flag on `run` and `config check`.

    `const`: a switch that stores this value (`--once` sets source.repeat to false).
    `parse`: a flag whose text sets more than its own key (`--broker HOST:PORT`).
    """

    names: tuple[str, ...]
    help: str = ""
    metavar: str | None = None
    const: Any = None
    parse: Callable[[Config, str], None] | None = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


def setting(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
            choices: tuple[str, ...] | None = None, secret: bool = False,
            flag: str | tuple[str, ...] | Flag | None = None, settable: bool = False) -> Any:
    """One setting's declaration, as the field of its section's dataclass."""
    if isinstance(flag, str | tuple):
        flag = Flag((flag,) if isinstance(flag, str) else flag)
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices,
                                            "secret": secret, "flag": flag, "settable": settable})


def source_from_spec(cfg: Config, spec: str) -> None:
    """--source: a word, a directory, or what OpenCV opens."""
    if not spec.strip():
        raise EdgecamError("--source '': empty; give auto, picamera2, a directory, a device (0, /dev/video0), "
                           "a URL or a video file")
    if spec in ("auto", "picamera2"):
        cfg.source.kind, cfg.source.uri = spec, ""
    elif Path(spec).is_dir():
        cfg.source.kind, cfg.source.uri = "folder", spec
    else:
        cfg.source.kind, cfg.source.uri = "opencv", spec


def broker_from_spec(cfg: Config, spec: str) -> None:
    """--broker HOST[:PORT]: the port only when given."""
    cfg.mqtt.host, cfg.mqtt.port = host_port(spec, "--broker", cfg.mqtt.port)


@dataclass
class SourceConfig:
    kind: str = setting(
        "auto", "where frames come from", choices=("auto", "picamera2", "opencv", "folder"),
        flag=Flag(("--source", "-s"), "auto, picamera2, a directory of images, a device (0, /dev/video0), a URL "
                  "or a video file (sets source.kind and source.uri)", "SPEC", parse=source_from_spec),
    )
    uri: str = setting(
        "", "opencv: device index, /dev/videoN, rtsp:// or http:// URL, or video file; folder: a directory"
    )
    repeat: bool = setting(True, "folder and video file: start again at the end",
                           flag=Flag(("--once",), "play a folder or video file once, then stop", const=False))
    fps: float = setting(
        0.0, "folder and video file: play at this rate like a camera (0: hand every frame to the loop)",
        lo=0, hi=240, flag=Flag(("--source-fps",), metavar="FPS"),
    )
    width: int = setting(640, "capture width asked of a camera (picamera2: the overlay stream)", lo=16, hi=8192)
    height: int = setting(480, "capture height asked of a camera", lo=16, hi=8192)
    read_timeout: float = setting(5.0, "seconds without a frame before the source counts as failed", lo=0.1, hi=600)
    max_pixels: int = setting(25_000_000, "folder: images whose header claims more pixels are skipped undecoded",
                              lo=1, hi=1_000_000_000)


@dataclass
class ModelConfig:
    name: str = setting("", "manifest model name or .tflite path (empty: the manifest's default)",
                        flag=("--model", "-m"))
    labels: str = setting("", "labels file (empty: the model's own)")
    threads: int = setting(0, "interpreter threads (0: one fewer than the cores, at least one, leaving a core to "
                           "the pipeline's scaling, CAM and spool)", lo=0, hi=64, flag="--threads")
    crop: bool = setting(False, "centre-crop frames to the model's aspect instead of resizing the whole frame")
    input_mean: str = setting(
        "", "input normalisation in pixel units: the model sees (pixel - mean) / std; one value or one per "
        "channel, as a string (\"127.5\" or \"123.7,116.3,103.5\"; empty: the manifest's, else the model's "
        "metadata, else raw pixels for quantized inputs, 127.5 for float)"
    )
    input_std: str = setting("", "input normalisation's std, with input_mean (same form)")


@dataclass
class LoopConfig:
    max_fps: float = setting(0.0, "at most this many frames a second (0: as fast as the model runs)", lo=0, hi=1000,
                             flag="--max-fps", settable=True)
    publish: str = setting("every", "publish every result, or only when the top-1 changes", choices=("every", "change"),
                           flag="--publish", settable=True)
    change_delta: float = setting(0.1, "publish=change: also publish when the top-1 score moves by more than this",
                                  lo=0, hi=1, settable=True)
    heartbeat: float = setting(30.0, "publish=change: publish at least every this many seconds", lo=0.1, hi=86400,
                               settable=True)
    overlay_every: int = setting(0, "publish an overlay JPEG every N published results (0: never)", lo=0, hi=1_000_000,
                                 flag=Flag(("--overlay-every",), metavar="N"), settable=True)
    overlay_width: int = setting(320, "overlay width in pixels", lo=16, hi=4096)
    overlay_height: int = setting(240, "overlay height in pixels", lo=16, hi=4096)
    overlay_style: str = setting("blend", "overlay style", choices=("blend", "dim"))
    jpeg_quality: int = setting(80, "overlay JPEG quality", lo=1, hi=100)
    heatmap_width: int = setting(0, "width of the published map (0: the raw map, e.g. 7)", lo=0, hi=64)
    heatmap_height: int = setting(0, "height of the published map (0: the raw map)", lo=0, hi=64)
    stats_interval: float = setting(10.0, "seconds between retained stats messages", lo=1, hi=3600)


@dataclass
class MqttConfig:
    enabled: bool = setting(True, "publish to a broker (false: print results as JSON lines on stdout)",
                           flag=Flag(("--no-mqtt",), "print results as JSON lines instead of publishing", const=False))
    host: str = setting("localhost", "broker host name or address",
                        flag=Flag(("--broker", "-b"), "MQTT broker (sets mqtt.host, and mqtt.port when given)",
                                  "HOST[:PORT]", parse=broker_from_spec))
    port: int = setting(1883, "broker port", lo=1, hi=65535)
    prefix: str = setting("edgecam", "topic prefix: topics are <prefix>/<device_id>/...", flag="--prefix")
    qos: int = setting(1, "QoS of results", lo=0, hi=1)
    keepalive: int = setting(30, "keepalive seconds", lo=5, hi=3600)
    protocol: str = setting("3.1.1", "MQTT protocol version", choices=("3.1.1", "5"))
    reconnect_min: float = setting(1.0, "first reconnect delay, seconds (doubles up to reconnect_max)", lo=0.1, hi=600)
    reconnect_max: float = setting(60.0, "longest reconnect delay, seconds", lo=1, hi=3600)
    max_queued: int = setting(1000, "messages held in memory when the spool file cannot be written", lo=1, hi=1_000_000)
    shutdown_timeout: float = setting(10.0, "seconds to wait for the broker's acknowledgements at exit", lo=0, hi=600)
    username: str = setting("", "broker user name")
    password: str = setting("", "broker password (better: password_file or EDGECAM_MQTT_PASSWORD)", secret=True)
    password_file: str = setting("", "file holding the broker password")
    tls: bool = setting(False, "connect with TLS (1.2 or newer)")
    ca_file: str = setting("", "CA certificate file for TLS (empty: the system's CAs)")
    cert_file: str = setting("", "client certificate for TLS")
    key_file: str = setting("", "client key for TLS")


@dataclass
class SpoolConfig:
    enabled: bool = setting(True, "keep undelivered results on disk (false: in memory only, up to mqtt.max_queued)")
    dir: str = setting("", "directory of the spool file (empty: $STATE_DIRECTORY, else /var/lib/edgecam if writable, "
                  "else ~/.local/state/edgecam)")
    max_mb: float = setting(64.0, "results kept at most, in MB", lo=0.01, hi=100_000)
    max_age_hours: float = setting(168.0, "results older than this are dropped, in hours", lo=0.001, hi=87_600)
    policy: str = setting("drop_oldest", "when full: drop the oldest results or refuse new ones",
                     choices=("drop_oldest", "drop_newest"))
    overlays: bool = setting(False, "keep undelivered overlays too (else they are sent only while connected)")
    overlay_mb: float = setting(8.0, "overlays kept at most, in MB", lo=0.01, hi=100_000)


@dataclass
class CommandsConfig:
    enabled: str = setting("auto", "commands on <prefix>/<device>/cmd: auto = only when the broker connection is "
                      "authenticated (mqtt.username set)", choices=("auto", "on", "off"))
    rate: float = setting(2.0, "commands a second allowed on average (bursts of 10); the rest are dropped",
                     lo=0.1, hi=1000)


@dataclass
class HomeAssistantConfig:
    discovery: bool = setting(False, "publish Home Assistant MQTT discovery messages (sensors and an image entity)")
    prefix: str = setting("homeassistant", "Home Assistant's discovery prefix")


@dataclass
class Config:
    device_id: str = setting(
        "", "device id in topics and the client id: 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit "
        "(empty: the host name, made to fit)", flag="--device-id",
    )
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


@dataclass(frozen=True)
class Setting:
    """One declared setting, as the derived tables see it."""

    section: str | None
    key: str
    field: dataclasses.Field

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        return env_name(self.section, self.key)

    @property
    def kind(self) -> type:
        return _kind(self.field)

    @property
    def flag(self) -> Flag | None:
        return self.field.metadata["flag"]

    @property
    def settable(self) -> bool:
        return self.field.metadata["settable"]

    @property
    def help(self) -> str:
        return self.field.metadata["help"]


def settings() -> Iterator[Setting]:
    """Every declared setting, in declaration order: device_id, then each section's keys."""
    cfg = Config()
    for section, target in [(None, cfg), *((s, getattr(cfg, s)) for s in SECTIONS)]:
        for key, f in _fields(target).items():
            yield Setting(section, key, f)


def settable() -> dict[str, Setting]:
    """What a `set` command may change, by the key name the command uses."""
    found: dict[str, Setting] = {}
    for s in settings():
        if s.settable:
            # Commands name keys without their section; two settable keys must not share a name.
            assert s.key not in found, f"two settable keys named {s.key}"
            found[s.key] = s
    return found


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Each declared flag on `parser`; values are checked as the setting's own (range, choices) when applied."""
    for s in settings():
        flag = s.flag
        if flag is None:
            continue
        helptext = flag.help or s.help
        if flag.const is not None:
            parser.add_argument(*flag.names, dest=flag.dest, action="store_const", const=flag.const, help=helptext)
            continue
        kind = str if flag.parse else s.kind
        parser.add_argument(*flag.names, dest=flag.dest, metavar=flag.metavar, help=helptext,
                            type=kind if kind in (int, float) else None,
                            choices=None if flag.parse else s.field.metadata["choices"])


def apply_flags(cfg: Config, args: argparse.Namespace) -> None:
    """The flags given on the command line (those not given are None), over the file and the environment."""
    for s in settings():
        flag = s.flag
        value = getattr(args, flag.dest, None) if flag else None
        if flag is None or value is None:
            continue
        if flag.parse is not None:
            flag.parse(cfg, value)
        else:
            set_value(cfg, s.dotted, value, flag.names[0])


def coerce(value: Any, f: dataclasses.Field, where: str, text: bool = False) -> Any:
    """The value as the field's type (parsed first when it comes as `text`), or one clear error naming `where`."""
    kind = _kind(f)
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


def _kind(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]


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
    if m.enabled and (why := host_problem(m.host) if m.host else "no host") is not None:
        raise EdgecamError(f"mqtt.host {shown(m.host, 80)}: {why}")
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
    check_prefix(cfg.homeassistant.prefix, "homeassistant.prefix", nested=True)
    check_device_id(cfg.device, "device_id")
    check_prefix(m.prefix, "mqtt.prefix")
    lp = cfg.loop
    if bool(lp.heatmap_width) != bool(lp.heatmap_height):
        raise EdgecamError("loop.heatmap_width and loop.heatmap_height go together (both 0 for the raw map)")
    if cfg.source.kind == "folder" and not cfg.source.uri:
        raise EdgecamError("source.uri: the folder source needs a directory")
    if cfg.source.kind == "opencv" and not cfg.source.uri:
        raise EdgecamError("source.uri: the opencv source needs a device, URL or file")


def effective_config(args: argparse.Namespace) -> tuple[Config, str]:
    """What `run` would run with, and where its file came from: the file, the environment, the flags, checked.
    Here, not beside the daemon's wiring (device/run.py): `config check` imports neither OpenCV nor the runtime."""
    cfg, origin = load(args.config)
    apply_flags(cfg, args)
    validate(cfg)
    return cfg, origin


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
    section = ""
    for s in settings():
        if s.section and s.section != section:
            section = s.section
            out += ["", f"[{section}]"]
        also = "".join((
            f", flag {s.flag.names[0]}" if s.flag else "",
            ", settable by command" if s.settable else "",
        ))
        out.append(f"# {s.help}  (env {s.env}{also})")
        out.append(f"# {s.key} = {to_toml_value(s.field.default)}")
    return "\n".join(out) + "\n"


def to_toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # JSON's string escapes are TOML's, control characters included; TOML also bars a raw DEL.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(v)
