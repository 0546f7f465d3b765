"""docs/configuration.md, made from the declarations in config.py: `edgecam config reference`.

The page is generated so it cannot drift from the code; tests/test_config.py fails when the
committed page differs from what this prints. Hand-written prose lives in the template here.
"""

from __future__ import annotations

from edgecam.device.config import SECTIONS, Setting, settable, settings, to_toml_value

REGENERATE = "edgecam config reference > docs/configuration.md"

INTRO = f"""# Configuration

<!-- Generated from the declarations in edgecam/device/config.py by `{REGENERATE}`.
     Edit those (or the template in edgecam/device/reference.py), then regenerate. -->

One TOML file: `--config FILE`, else `$EDGECAM_CONFIG`, else `/etc/edgecam/edgecam.toml` (when that
does not exist, the defaults). Then environment variables `EDGECAM_<SECTION>_<KEY>` (for example
`EDGECAM_MQTT_HOST`, `EDGECAM_LOOP_MAX_FPS`, `EDGECAM_DEVICE_ID`) override the file, and flags of
`edgecam run` and `edgecam config check` override both. `edgecam config check` validates all three
layers and prints the effective configuration, secrets shown as `<redacted>`; `edgecam config default`
prints every key with its default and meaning, as a commented config file. An unknown key, a wrong
type or a value out of range is one line naming the key and where it came from:

```
$ edgecam config check -c site.toml
edgecam: error: site.toml: loop.max_fps: -1.0 is out of range (0..1000)
```

For example:

```toml
device_id = "greenhouse-3"      # topic level and MQTT client id; default: the host name

[source]
kind = "opencv"
uri = "rtsp://192.168.1.20/stream1"

[loop]
max_fps = 2.0
publish = "change"              # only when the top-1 changes, and every heartbeat
overlay_every = 10

[mqtt]
host = "broker.lan"
port = 8883
tls = true                      # TLS 1.2+, host name checked
username = "greenhouse-3"
password_file = "/etc/edgecam/mqtt.pass"
```

TLS and credentials on a deployed device: see [Deploy on a Raspberry Pi](install.md#deploy-on-a-raspberry-pi).
Keys that must agree are checked together: `mqtt.reconnect_min` is at most `mqtt.reconnect_max`;
`mqtt.password` and `mqtt.password_file` are not both set; `mqtt.cert_file` and `mqtt.key_file` go
together; `loop.heatmap_width` and `loop.heatmap_height` are both 0 or both set; the folder and opencv
sources need `source.uri`.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _allowed(s: Setting) -> str:
    meta = s.field.metadata
    if meta["choices"]:
        return " \\| ".join(f"`{c}`" for c in meta["choices"])
    if s.kind is bool:
        return "`true` \\| `false`"
    if s.kind in (int, float):
        def num(v: float) -> str:
            return (f"{int(v):_}" if v >= 10_000 else str(int(v))) if float(v).is_integer() else str(v)

        kind = "whole number" if s.kind is int else "number"
        return f"{kind}, {num(meta['lo'])} to {num(meta['hi'])}"
    return "text"


def _row(s: Setting) -> str:
    notes = []
    if s.field.metadata["secret"]:
        notes.append("secret: shown as `<redacted>`")
    if s.settable:
        notes.append("a `set` command may change it")
    meaning = s.help + (f" ({'; '.join(notes)})" if notes else "")
    flag = ", ".join(f"`{n}`" for n in s.flag.names) if s.flag else ""
    default = to_toml_value(s.field.default)
    return f"| `{s.key}` | `{_cell(default)}` | {_allowed(s)} | `{s.env}` | {flag} | {_cell(meaning)} |"


def reference() -> str:
    """The whole page, as committed in docs/configuration.md."""
    out = [INTRO]
    by_section: dict[str | None, list[Setting]] = {}
    for s in settings():
        by_section.setdefault(s.section, []).append(s)
    header = ["| key | default | allowed | environment | flag | meaning |", "|---|---|---|---|---|---|"]
    for section in (None, *SECTIONS):
        title = "Top level" if section is None else f"`[{section}]`"
        out += ["", f"## {title}", "", *header, *(_row(s) for s in by_section[section])]
    out += [
        "",
        "## Changed at run time by a command",
        "",
        "With commands on, `{\"cmd\": \"set\", ...}` on `<prefix>/<device>/cmd` may change these keys, within"
        " the ranges above, until the next restart (see [the daemon's commands](daemon.md#commands-on-cmd)): "
        + ", ".join(f"`{k}`" for k in settable()) + ".",
        "",
        "## Flags",
        "",
        "Flags of `edgecam run` and `edgecam config check` besides those above: `--config`/`-c FILE` (the",
        "TOML file); `run` also takes `--max-frames N` (stop cleanly after N frames) and `--verbose`/`-v`.",
    ]
    return "\n".join(out) + "\n"
