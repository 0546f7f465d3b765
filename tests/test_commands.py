"""Commands on <prefix>/<device>/cmd (edgecam.device.commands): parsing, checking, replies, the rate limit. All pure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import LABELS

from edgecam.core.labels import fit_labels, read_labels
from edgecam.device.commands import MAX_BYTES, Command, CommandError, RateLimit, parse, reply

# The 1001 classes of the default model: 0 is "background".
NAMES = fit_labels(read_labels(LABELS), 1001, "labels")


def cmd(obj: Any) -> Command:
    return parse(json.dumps(obj).encode("utf-8"), NAMES)


def rejected(payload: bytes | Any) -> CommandError:
    """The CommandError for a payload (bytes as they are, anything else as JSON)."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    with pytest.raises(CommandError) as info:
        parse(raw, NAMES)
    assert type(info.value) is CommandError
    return info.value


def test_the_labels_are_the_default_models() -> None:
    assert len(NAMES) == 1001
    assert NAMES[0] == "background"
    assert NAMES[20] == "chickadee"
    assert NAMES[282] == "tabby, tabby cat"
    assert NAMES[283] == "tiger cat"
    assert NAMES[286] == "Egyptian cat"


# --- accepted commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ping", "snapshot"])
def test_ping_and_snapshot(name: str) -> None:
    assert cmd({"cmd": name}) == Command(name)
    assert cmd({"cmd": name, "id": "req-1"}) == Command(name, "req-1")
    assert cmd({"cmd": name, "id": 17}) == Command(name, 17)
    assert cmd({"cmd": name, "id": None}) == Command(name, None)


@pytest.mark.parametrize("name", ["ping", "snapshot"])
@pytest.mark.parametrize("extra", ["class", "frames", "max_fps", "when"])
def test_ping_and_snapshot_take_no_fields(name: str, extra: str) -> None:
    exc = rejected({"cmd": name, "id": "a", extra: 1})
    assert str(exc) == f"unknown field {extra!r} for {name}"
    assert exc.id == "a"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("tabby", 282),  # a synonym in "tabby, tabby cat"
        ("tabby cat", 282),
        ("TABBY Cat", 282),
        ("tiger cat", 283),
        ("Egyptian cat", 286),
        ("egyptian CAT", 286),
        ("  Egyptian cat  ", 286),
        ("chickadee", 20),
        ("background", 0),
        (286, 286),
        ("286", 286),
        (" 286 ", 286),
        (0, 0),
        ("0", 0),
        (1000, 1000),
    ],
)
def test_explain_class(query: str | int, expected: int) -> None:
    c = cmd({"cmd": "explain", "class": query})
    assert c == Command("explain", None, cls=expected, frames=1)


@pytest.mark.parametrize("frames", [1, 5, 1000])
def test_explain_frames(frames: int) -> None:
    c = cmd({"cmd": "explain", "class": "Egyptian cat", "frames": frames, "id": "e1"})
    assert c == Command("explain", "e1", cls=286, frames=frames)


def test_explain_frames_default_to_one() -> None:
    assert cmd({"cmd": "explain", "class": 20}).frames == 1


@pytest.mark.parametrize(
    ("fields", "changes"),
    [
        ({"max_fps": 2}, {"max_fps": 2.0}),
        ({"max_fps": 0}, {"max_fps": 0.0}),
        ({"max_fps": 12.5}, {"max_fps": 12.5}),
        ({"max_fps": 1000}, {"max_fps": 1000.0}),
        ({"publish": "change"}, {"publish": "change"}),
        ({"publish": "every"}, {"publish": "every"}),
        ({"change_delta": 0.25}, {"change_delta": 0.25}),
        ({"change_delta": 0}, {"change_delta": 0.0}),
        ({"change_delta": 1}, {"change_delta": 1.0}),
        ({"heartbeat": 10}, {"heartbeat": 10.0}),
        ({"heartbeat": 0.1}, {"heartbeat": 0.1}),
        ({"overlay_every": 0}, {"overlay_every": 0}),
        ({"overlay_every": 3}, {"overlay_every": 3}),
        ({"publish": "change", "change_delta": 0.05, "heartbeat": 60}, {
            "publish": "change", "change_delta": 0.05, "heartbeat": 60.0}),
        ({"max_fps": 5, "publish": "every", "change_delta": 0.2, "heartbeat": 30, "overlay_every": 10}, {
            "max_fps": 5.0, "publish": "every", "change_delta": 0.2, "heartbeat": 30.0, "overlay_every": 10}),
    ],
)
def test_set(fields: dict[str, Any], changes: dict[str, Any]) -> None:
    c = cmd({"cmd": "set", "id": 3, **fields})
    assert c.cmd == "set"
    assert c.id == 3
    assert c.changes == changes
    for key, value in c.changes.items():
        assert type(value) is type(changes[key]), key  # floats are floats, whole numbers ints


@pytest.mark.parametrize("rid", ["abc", "", "x" * 100, 0, 42, -7, 10**50])
def test_ids_are_kept(rid: str | int) -> None:
    assert cmd({"cmd": "ping", "id": rid}).id == rid
    c = cmd({"id": rid, "cmd": "explain", "class": "tabby", "frames": 2})
    assert (c.id, c.cls, c.frames) == (rid, 282, 2)
    assert type(c.id) is type(rid)


def test_a_payload_of_exactly_the_limit_is_read() -> None:
    head = b'{"cmd": "ping", "id": "big"'
    raw = head + b" " * (MAX_BYTES - len(head) - 1) + b"}"
    assert len(raw) == MAX_BYTES
    assert parse(raw, NAMES) == Command("ping", "big")


def test_surrounding_whitespace_and_utf8_are_fine() -> None:
    assert parse(b'  \n{"cmd":"ping","id":"caf\xc3\xa9"}\n', NAMES) == Command("ping", "café")


# --- rejected commands ----------------------------------------------------------------------------


def test_too_big() -> None:
    head = b'{"cmd": "ping", "id": "big"'
    raw = head + b" " * (MAX_BYTES + 1 - len(head) - 1) + b"}"
    assert len(raw) == MAX_BYTES + 1
    exc = rejected(raw)
    assert str(exc) == f"payload of {MAX_BYTES + 1} bytes is over {MAX_BYTES}"
    assert getattr(exc, "id", None) is None  # not read, so no id to give back


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"ping",
        b"{cmd: ping}",
        b'{"cmd": "ping"',
        b'{"cmd": "ping"} {"cmd": "ping"}',
        b"'{\"cmd\": \"ping\"}'",
        b'{"cmd": "ping", "id": "\xff\xfe"}',  # not UTF-8
        b"\xff" * 10,
        b'{"cmd": "ping", "id": "\xc3"}',  # a cut-off UTF-8 sequence
    ],
)
def test_not_json(raw: bytes) -> None:
    exc = rejected(raw)
    assert str(exc) == "not JSON"
    assert getattr(exc, "id", None) is None


@pytest.mark.parametrize(
    ("obj", "kind"),
    [([{"cmd": "ping"}], "list"), (5, "int"), (2.5, "float"), ("ping", "str"), (None, "NoneType"), (True, "bool")],
)
def test_not_an_object(obj: Any, kind: str) -> None:
    exc = rejected(obj)
    assert str(exc) == f"a command is a JSON object, got {kind}"
    assert getattr(exc, "id", None) is None


@pytest.mark.parametrize("obj", [{}, {"id": "n1"}, {"id": "n1", "cmd": None}, {"id": "n1", "class": "tabby"}])
def test_no_cmd(obj: dict[str, Any]) -> None:
    exc = rejected(obj)
    assert str(exc) == "no 'cmd'"
    assert exc.id == obj.get("id")  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["reboot", "PING", "Ping", " ping", "", 5, ["ping"], {"x": 1}, True])
def test_unknown_cmd(name: Any) -> None:
    exc = rejected({"cmd": name, "id": 9})
    assert str(exc) == f"unknown command {name!r}; known: explain, snapshot, set, ping"
    assert exc.id == 9  # type: ignore[attr-defined]


def test_unknown_cmd_is_shortened_in_the_message() -> None:
    exc = rejected({"cmd": "z" * 500, "id": "long"})
    # Cut at 40 characters of its repr, with an ellipsis saying so.
    assert str(exc) == "unknown command '" + "z" * 38 + "…; known: explain, snapshot, set, ping"
    assert exc.id == "long"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"cmd": "explain", "class": "tabby", "colour": "red"}, "colour"),
        ({"cmd": "explain", "class": "tabby", "max_fps": 2}, "max_fps"),
        ({"cmd": "set", "max_fps": 2, "fps": 2}, "fps"),
        ({"cmd": "set", "max_fps": 2, "frames": 2}, "frames"),
        ({"cmd": "set", "jpeg_quality": 50}, "jpeg_quality"),  # a loop key, but not one that can be set
        ({"cmd": "set", "overlay_width": 100}, "overlay_width"),
        ({"cmd": "explain", "class": "tabby", "Frames": 2}, "Frames"),
    ],
)
def test_unknown_field(obj: dict[str, Any], field: str) -> None:
    exc = rejected({**obj, "id": "u"})
    assert str(exc) == f"unknown field {field!r} for {obj['cmd']}"
    assert exc.id == "u"  # type: ignore[attr-defined]


def test_explain_needs_a_class() -> None:
    exc = rejected({"cmd": "explain", "frames": 3, "id": "x1"})
    assert str(exc) == "explain needs 'class' (a label or a class id)"
    assert exc.id == "x1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["unicorn", "cat", "tabb", "", "Egyptian", "tabby,", "-1", "2.5"])
def test_explain_unknown_class_name(name: str) -> None:
    exc = rejected({"cmd": "explain", "class": name, "id": 1})
    assert str(exc) == f"class {name.strip()!r} is not a label of this model"
    assert exc.id == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("query", [5000, "5000", 1001, "1001", 10**30])
def test_explain_class_id_out_of_range(query: int | str) -> None:
    exc = rejected({"cmd": "explain", "class": query, "id": "r"})
    assert str(exc) == f"class id {int(query)} is out of range (0..1000)"
    assert exc.id == "r"  # type: ignore[attr-defined]


def test_explain_ambiguous_class() -> None:
    # "panther" is a synonym of both 287 (cougar) and 291 (jaguar).
    exc = rejected({"cmd": "explain", "class": "panther", "id": "amb"})
    assert str(exc).startswith("class 'panther' is ambiguous: ")
    assert "287 " in str(exc)
    assert "291 " in str(exc)
    assert exc.id == "amb"  # type: ignore[attr-defined]


@pytest.mark.parametrize("query", [True, False, [286], ["tabby"], {"id": 286}, None, 2.5, 286.0])
def test_explain_class_of_the_wrong_type(query: Any) -> None:
    exc = rejected({"cmd": "explain", "class": query, "id": 4})
    assert str(exc) == "'class' must be a label or a class id"
    assert exc.id == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("query", ["\u00b2", "\u2460"])
def test_explain_class_of_digit_like_characters(query: str) -> None:
    exc = rejected({"cmd": "explain", "class": query, "id": "d"})
    assert exc.id == "d"  # type: ignore[attr-defined]


@pytest.mark.parametrize("frames", [0, -1, 1001, 10**9, 2.5, 1.0, True, False, "5", None, [5]])
def test_explain_bad_frames(frames: Any) -> None:
    exc = rejected({"cmd": "explain", "class": "tabby", "frames": frames, "id": "f"})
    assert str(exc) == "'frames' must be a whole number from 1 to 1000"
    assert exc.id == "f"  # type: ignore[attr-defined]


def test_set_needs_something() -> None:
    exc = rejected({"cmd": "set", "id": "s0"})
    assert str(exc) == "set needs one of max_fps, publish, change_delta, heartbeat, overlay_every"
    assert exc.id == "s0"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_fps": -1}, "max_fps: -1.0 is out of range (0..1000)"),
        ({"max_fps": 1000.5}, "max_fps: 1000.5 is out of range (0..1000)"),
        ({"overlay_every": -2}, "overlay_every: -2 is out of range (0..1000000)"),
        ({"overlay_every": 1_000_001}, "overlay_every: 1000001 is out of range (0..1000000)"),
        ({"change_delta": 2}, "change_delta: 2.0 is out of range (0..1)"),
        ({"change_delta": -0.1}, "change_delta: -0.1 is out of range (0..1)"),
        ({"heartbeat": 0}, "heartbeat: 0.0 is out of range (0.1..86400)"),
        ({"heartbeat": 86401}, "heartbeat: 86401.0 is out of range (0.1..86400)"),
        ({"publish": "sometimes"}, "publish: 'sometimes' is not one of every, change"),
        ({"publish": "Every"}, "publish: 'Every' is not one of every, change"),
        # A bad value fails the whole command, good ones beside it included.
        ({"publish": "change", "max_fps": -1}, "max_fps: -1.0 is out of range (0..1000)"),
    ],
)
def test_set_out_of_range(fields: dict[str, Any], message: str) -> None:
    exc = rejected({"cmd": "set", "id": "s1", **fields})
    assert str(exc) == message
    assert exc.id == "s1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity"])
def test_set_non_finite(raw: bytes) -> None:
    exc = rejected(b'{"cmd": "set", "id": "nan", "max_fps": ' + raw + b"}")
    assert "max_fps" in str(exc)
    assert "out of range" in str(exc)
    assert exc.id == "nan"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_fps": "fast"}, "max_fps: expected a number, got a string 'fast'"),
        ({"max_fps": "2"}, "max_fps: expected a number, got a string '2'"),
        ({"max_fps": True}, "max_fps: expected a number, got true or false True"),
        ({"max_fps": None}, "max_fps: expected a number, got NoneType None"),
        ({"overlay_every": 2.5}, "overlay_every: expected a whole number, got a number 2.5"),
        ({"overlay_every": True}, "overlay_every: expected a whole number, got true or false True"),
        ({"publish": 1}, "publish: expected a string, got a whole number 1"),
        ({"heartbeat": [10]}, "heartbeat: expected a number, got list [10]"),
    ],
)
def test_set_wrong_type(fields: dict[str, Any], message: str) -> None:
    exc = rejected({"cmd": "set", "id": 8, **fields})
    assert str(exc) == message
    assert exc.id == 8  # type: ignore[attr-defined]


@pytest.mark.parametrize("rid", [True, False, [1], ["a"], {"n": 1}, 1.5, "x" * 101, "y" * 200, 10**101])
@pytest.mark.parametrize("name", ["ping", "snapshot", "reboot"])
def test_bad_id(rid: Any, name: str) -> None:
    exc = rejected({"cmd": name, "id": rid})
    assert str(exc) == "'id' must be a string or a number of at most 100 characters"


# --- replies --------------------------------------------------------------------------------------


def test_reply_is_compact_json() -> None:
    assert reply("a1", True) == b'{"id":"a1","ok":true}'
    assert reply(None, False, error="not JSON") == b'{"id":null,"ok":false,"error":"not JSON"}'
    out = reply(7, True, cmd="set", max_fps=2.0, publish="change")
    assert isinstance(out, bytes)
    assert out == b'{"id":7,"ok":true,"cmd":"set","max_fps":2.0,"publish":"change"}'
    assert json.loads(reply("é", True, label="Egyptian cat")) == {"id": "é", "ok": True, "label": "Egyptian cat"}


def test_reply_to_a_rejected_command_carries_its_id() -> None:
    exc = rejected({"cmd": "explain", "class": "unicorn", "id": "q-17"})
    out = json.loads(reply(getattr(exc, "id", None), False, error=str(exc)))
    assert out == {"id": "q-17", "ok": False, "error": "class 'unicorn' is not a label of this model"}


# --- the rate limit -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 500.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_rate_limit_burst_then_refuse() -> None:
    clock = FakeClock()
    rl = RateLimit(2, burst=10, clock=clock)
    assert [rl.allow() for _ in range(10)] == [True] * 10
    assert [rl.allow() for _ in range(5)] == [False] * 5


def test_rate_limit_refills_at_the_rate() -> None:
    clock = FakeClock()
    rl = RateLimit(2, burst=10, clock=clock)
    for _ in range(10):
        assert rl.allow()
    assert not rl.allow()
    clock.now += 1.0  # 2 a second: two more
    assert [rl.allow() for _ in range(3)] == [True, True, False]
    # Half a token at a time: refused calls do not lose the time that passed.
    clock.now += 0.25
    assert not rl.allow()
    clock.now += 0.25
    assert rl.allow()
    assert not rl.allow()


def test_rate_limit_never_holds_more_than_the_burst() -> None:
    clock = FakeClock()
    rl = RateLimit(2, burst=10, clock=clock)
    for _ in range(10):
        assert rl.allow()
    clock.now += 3600  # an hour of quiet is worth one burst, not 7200 commands
    assert [rl.allow() for _ in range(12)] == [True] * 10 + [False] * 2
    # And a fresh limiter starts with one burst.
    rl2 = RateLimit(0.5, burst=3, clock=FakeClock())
    assert [rl2.allow() for _ in range(4)] == [True, True, True, False]


def test_rate_limit_slow_rate() -> None:
    clock = FakeClock()
    rl = RateLimit(0.5, burst=1, clock=clock)
    assert rl.allow()
    clock.now += 1.0
    assert not rl.allow()  # half a token
    clock.now += 1.0
    assert rl.allow()
    assert not rl.allow()
