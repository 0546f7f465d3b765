"""Property-based tests (hypothesis) of the three parsers that take input from outside the device.

The command parser, the config loader and the payload decoder each get thousands of generated
inputs: arbitrary bytes and text, arbitrary JSON values, and near-valid documents one mistake away
from a good one. Every input must end in a result or in the parser's own error type, whose message is
one non-empty line naming what is wrong; valid inputs must survive a round trip.
"""

from __future__ import annotations

import atexit
import base64
import copy
import dataclasses
import functools
import json
import math
import shutil
import string
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import LABELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from edgecam.cli.watch import check_result
from edgecam.contract import PayloadError, decode_cam, encode_cam, result_payload
from edgecam.core.labels import fit_labels, read_labels
from edgecam.device import config
from edgecam.device.commands import MAX_BYTES, MAX_FRAMES, SETTABLE, Command, CommandError, parse
from edgecam.device.config import Config, EdgecamError
from edgecam.web.fleet import Fleet

# derandomize: CI sees the same inputs on every run. database=None keeps no examples, but hypothesis still
# caches Unicode tables and source constants under ./.hypothesis: those go to a temporary directory instead.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="edgecam-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# The daemon parses commands against its classifier's labels: the 1001 of the default model.
NAMES = fit_labels(read_labels(LABELS), 1001, "labels")


def one_line(exc: BaseException, *needles: str, short: bool = False) -> str:
    """The message is one non-empty line (as the CLI and the error replies print it) holding every needle."""
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert len(msg.splitlines()) == 1, f"{type(exc).__name__} message is not one line: {msg[:500]!r}"
    if short:
        # An error reply is read by a person on a dashboard: it must not echo a 4 KB payload back.
        assert len(msg) < 300, f"{len(msg)}-character message: {msg[:120]!r}..."
    for needle in needles:
        assert named(needle, msg), f"{needle!r} not in {msg[:500]!r}"
    return msg


def named(needle: str, msg: str) -> bool:
    """Whether the message names `needle`: whole, or (a long repr) its first 30 characters, as cut by errors.shown."""
    return needle in msg or (len(needle) > 30 and needle[:30] in msg and "…" in msg)


# -- generic input strategies -----------------------------------------------------------------------

# Integers past 64 bits and past the float range (309 digits), but under Python's 4300-digit str limit:
# JSON and TOML both carry them. The sizes around the edges are named, as hypothesis favours small ones.
huge_ints = st.builds(
    lambda digits, sign: sign * (10**digits + 7),
    st.sampled_from([19, 20, 39, 308, 309, 400, 1200]) | st.integers(19, 1200),
    st.sampled_from([1, -1]),
)
# Long strings are cheap to build by repetition and are what an error message must not echo whole.
long_text = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(60, 400))
texts = st.text(max_size=20) | long_text
json_scalars = st.none() | st.booleans() | st.integers() | huge_ints | st.floats() | st.text(max_size=30) | long_text


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5))


json_values = st.recursive(json_scalars, _json_containers, max_leaves=10)


def deep_json(opener: bytes, closer: bytes, limit: int) -> st.SearchStrategy[bytes]:
    """Deeply nested arrays or objects, closed or not: the nesting a recursive decoder has to survive."""
    return st.builds(
        lambda n, closed: opener * n + b"0" + (closer * n if closed else b""),
        st.integers(1, limit),
        st.booleans(),
    )


def nested_payloads(limit: int) -> st.SearchStrategy[bytes]:
    return deep_json(b"[", b"]", limit) | deep_json(b'{"a":', b"}", limit // 5)


def dumps(value: Any) -> bytes:
    # Python writes NaN and Infinity, which its own json.loads reads back: inputs a peer could send.
    return json.dumps(value).encode("utf-8")


def weighted(draw: st.DrawFn, *choices: tuple[int, st.SearchStrategy[Any]]) -> Any:
    """One of the strategies, picked in proportion to its weight."""
    pick = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, strategy in choices:
        if pick < w:
            return draw(strategy)
        pick -= w
    raise AssertionError("unreachable")


# -- 1. the command parser ------------------------------------------------------------------------------

LOOP_FIELDS = {f.name: f for f in dataclasses.fields(config.LoopConfig)}
# A synonym that names exactly one class (not "crane", not "cardigan") is a way to name that class.
# Matching ignores case, so uniqueness does too; a synonym that is also a whole label names that label.
_SYNONYM_OWNERS: dict[str, list[int]] = {}
for _i, _label in enumerate(NAMES):
    for _syn in _label.split(","):
        _SYNONYM_OWNERS.setdefault(_syn.strip().lower(), []).append(_i)
_LOWER_LABELS = {label.lower() for label in NAMES}
UNIQUE_SYNONYMS = sorted(
    syn.strip()
    for label in NAMES
    for syn in label.split(",")
    if syn.strip() and len(_SYNONYM_OWNERS[syn.strip().lower()]) == 1 and syn.strip().lower() not in _LOWER_LABELS
)
KNOWN_WORDS = {w.lower() for label in NAMES for w in [label, *(s.strip() for s in label.split(","))]}


def names_no_class(text: str) -> bool:
    """Independent of edgecam.core.labels: a string that is no id, no label and no synonym in any case."""
    t = text.strip()
    return not (t.isascii() and t.isdigit()) and t.lower() not in KNOWN_WORDS


def field_kind(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[f.type] if isinstance(f.type, str) else f.type


@functools.cache
def valid_value(f: dataclasses.Field) -> st.SearchStrategy[Any]:
    """Any value the field's declaration allows (type, lo..hi, choices)."""
    kind, meta = field_kind(f), f.metadata
    if kind is bool:
        return st.booleans()
    if kind is str:
        return st.sampled_from(meta["choices"]) if meta["choices"] else texts
    lo, hi = meta["lo"], meta["hi"]
    ints = st.integers(math.ceil(lo), math.floor(hi))
    if kind is int:
        return ints
    return st.floats(lo, hi, allow_nan=False) | ints


@functools.cache
def invalid_value(f: dataclasses.Field, null: bool = True) -> st.SearchStrategy[Any]:
    """A value of the wrong type, out of range or not a choice, as JSON (or without null, TOML) would carry it."""
    kind, meta = field_kind(f), f.metadata
    scalars = json_scalars if null else toml_scalars
    others = st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=5), scalars, max_size=3)
    if null:
        others = others | st.none()
    if kind is bool:
        return others | st.integers() | st.floats() | texts
    if kind is str:
        choices = meta["choices"]
        wrong_text = [texts.filter(lambda s: s not in choices)] if choices else []
        return st.one_of(others, st.booleans(), st.integers(), st.floats(), *wrong_text)
    lo, hi = meta["lo"], meta["hi"]
    out_of_range = (
        st.integers(max_value=math.ceil(lo) - 1)
        | st.integers(min_value=math.floor(hi) + 1)
        | huge_ints
        # The filters keep -0.0 out: it equals 0 and is in range.
        | st.floats(max_value=lo).filter(lambda x: x < lo)
        | st.floats(min_value=hi).filter(lambda x: x > hi)
        | st.just(math.nan)
    )
    if kind is int:
        # A float is never a whole number here, not even 5.0: JSON numbers keep their type.
        out_of_range = out_of_range | st.floats()
    return others | st.booleans() | texts | out_of_range


cmd_ids = st.none() | st.text(max_size=100) | st.integers(-(10**99) + 1, 10**100 - 1)


@st.composite
def valid_commands(draw: st.DrawFn) -> tuple[dict[str, Any], Command]:
    """A command the contract allows, and the Command it must parse to."""
    rid = draw(cmd_ids)
    name = draw(st.sampled_from(["ping", "snapshot", "explain", "set"]))
    obj: dict[str, Any] = {"cmd": name}
    if rid is not None or draw(st.booleans()):
        obj["id"] = rid
    if name == "explain":
        how = draw(st.sampled_from(["id", "digits", "label", "case", "synonym"]))
        if how in ("id", "digits"):
            cls = draw(st.integers(0, len(NAMES) - 1))
            obj["class"] = cls if how == "id" else str(cls)
        elif how == "synonym":
            syn = draw(st.sampled_from(UNIQUE_SYNONYMS))
            obj["class"], cls = syn, _SYNONYM_OWNERS[syn.lower()][0]
        else:
            label = NAMES[draw(st.integers(0, len(NAMES) - 1))]
            q = label if how == "label" else draw(st.sampled_from([label.upper(), label.lower(), label.title()]))
            # Exact match first, then the first case-insensitive one ("crane" is there twice).
            cls = NAMES.index(q) if q in NAMES else next(i for i, lab in enumerate(NAMES) if lab.lower() == q.lower())
            obj["class"] = q
        frames = draw(st.none() | st.integers(1, MAX_FRAMES))
        if frames is not None:
            obj["frames"] = frames
        return obj, Command("explain", rid, cls=cls, frames=frames or 1)
    if name == "set":
        keys = draw(st.lists(st.sampled_from(SETTABLE), min_size=1, unique=True))
        changes = {k: draw(valid_value(LOOP_FIELDS[k])) for k in keys}
        obj.update(changes)
        expected = {k: float(v) if field_kind(LOOP_FIELDS[k]) is float else v for k, v in changes.items()}
        return obj, Command("set", rid, changes=expected)
    return obj, Command(name, rid)


@st.composite
def broken_commands(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid command with exactly one mistake, and the word its error must name."""
    raw, needle = draw(_one_mistake())
    # A mistake that also pushes the payload over the limit is rightly reported as the size.
    return raw, needle if len(raw) <= MAX_BYTES else str(MAX_BYTES)


@st.composite
def _one_mistake(draw: st.DrawFn) -> tuple[bytes, str]:
    obj, _ = draw(valid_commands())
    name = obj["cmd"]
    fields = {"explain": ["class", "frames"], "set": list(SETTABLE)}.get(name, [])
    mistakes = ["id", "extra", "cmd", "oversize", *(["field"] if fields else []), *(["empty"] if name == "set" else [])]
    mistake = draw(st.sampled_from(mistakes))
    if mistake == "id":
        obj["id"] = draw(
            st.booleans()
            | st.floats()
            | st.lists(json_scalars, max_size=2)
            | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2)
            | st.text(min_size=101, max_size=300)
            | st.integers(min_value=10**100)
            | st.integers(max_value=-(10**99))
        )
        return dumps(obj), "'id'"
    if mistake == "extra":
        key = draw(st.text(max_size=50).filter(lambda k: k not in ("cmd", "id", *fields)))
        obj[key] = draw(json_values)
        return dumps(obj), repr(key[:40])
    if mistake == "cmd":
        value = draw(json_values.filter(lambda v: v not in ("ping", "snapshot", "explain", "set")))
        obj["cmd"] = value
        return dumps(obj), "'cmd'" if value is None else "unknown command"
    if mistake == "oversize":
        raw = dumps(obj)
        return raw + b" " * draw(st.integers(MAX_BYTES + 1 - len(raw), 3 * MAX_BYTES)), str(MAX_BYTES)
    if mistake == "empty":
        obj = {k: v for k, v in obj.items() if k not in SETTABLE}
        return dumps(obj), "set needs"
    key = draw(st.sampled_from(fields))
    if key == "class":
        obj["class"] = draw(
            st.booleans()
            | st.floats()
            | st.none()
            | st.lists(json_scalars, max_size=2)
            | st.integers(max_value=-1)
            | st.integers(min_value=len(NAMES))
            | huge_ints
            | texts.filter(names_no_class)
        )
    elif key == "frames":
        obj["frames"] = draw(
            st.booleans()
            | st.floats()
            | st.none()
            | texts
            | st.integers(max_value=0)
            | st.integers(min_value=MAX_FRAMES + 1)
            | huge_ints
        )
    else:
        obj[key] = draw(invalid_value(LOOP_FIELDS[key]))
    return dumps(obj), key


def parse_or_error(raw: bytes) -> Command | CommandError:
    """parse's answer; any exception but CommandError propagates and fails the test."""
    try:
        return parse(raw, NAMES)
    except CommandError as exc:
        one_line(exc, short=True)
        return exc


@settings(BASE, max_examples=2000)
@given(st.binary(max_size=MAX_BYTES + 200) | nested_payloads(MAX_BYTES // 2) | st.text().map(str.encode))
def test_parse_arbitrary_bytes_gives_a_command_or_a_command_error(raw: bytes) -> None:
    out = parse_or_error(raw)
    assert isinstance(out, Command | CommandError)


near_valid_objects = st.builds(
    lambda cmd, rest: {"cmd": cmd, **rest},
    st.sampled_from(["ping", "snapshot", "explain", "set"]) | json_scalars,
    st.dictionaries(
        st.sampled_from(["id", "class", "frames", *SETTABLE]) | st.text(max_size=8), json_values, max_size=4
    ),
)


@settings(BASE, max_examples=1200)
@given(json_values | near_valid_objects)
def test_parse_arbitrary_json_gives_a_command_or_an_error_naming_a_field(value: Any) -> None:
    out = parse_or_error(dumps(value))
    if isinstance(out, CommandError) and isinstance(value, dict) and len(dumps(value)) <= MAX_BYTES:
        # Every rejection of an object points at something in it: a field it has, or its command.
        named = [*map(str, value), str(value.get("cmd")), "cmd", "command"]
        assert any(word in str(out) for word in named), f"{str(out)!r} names none of {named[:10]}"


@settings(BASE, max_examples=1000)
@given(valid_commands())
def test_valid_commands_are_accepted_with_their_fields(case: tuple[dict[str, Any], Command]) -> None:
    obj, expected = case
    got = parse(dumps(obj), NAMES)
    assert got == expected
    for key, value in got.changes.items():
        assert type(value) is field_kind(LOOP_FIELDS[key])


@settings(BASE, max_examples=1200)
@given(broken_commands())
def test_a_command_with_one_mistake_is_refused_naming_it(case: tuple[bytes, str]) -> None:
    raw, needle = case
    out = parse_or_error(raw)
    assert isinstance(out, CommandError), f"accepted {raw[:200]!r} as {out}"
    one_line(out, needle, short=True)


# -- 2. the config loader ---------------------------------------------------------------------------------


def keys_of(target: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(target) if f.name not in config.SECTIONS}


SECTION_FIELDS: dict[str | None, dict[str, dataclasses.Field]] = {
    None: keys_of(Config),
    **{s: keys_of(type(getattr(Config(), s))) for s in config.SECTIONS},
}
KEY_NAMES = [f"{s}.{k}" if s else k for s, fields in SECTION_FIELDS.items() for k in fields]
ENV_FIELDS = {config.env_name(s, k): (s, k, f) for s, fields in SECTION_FIELDS.items() for k, f in fields.items()}


def accepts(f: dataclasses.Field, value: Any) -> bool:
    """The declaration's own rules, written out again: the oracle for which values must load."""
    kind, meta = field_kind(f), f.metadata
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, str) and (not meta["choices"] or value in meta["choices"])
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and isinstance(value, float)):
        return False
    return (
        value == value and (meta["lo"] is None or value >= meta["lo"]) and (meta["hi"] is None or value <= meta["hi"])
    )


def as_field(f: dataclasses.Field, value: Any) -> Any:
    return float(value) if field_kind(f) is float else value


toml_scalars = st.booleans() | st.integers() | huge_ints | st.floats() | st.text(max_size=20) | long_text | st.dates()


def _toml_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4))


toml_values = st.recursive(toml_scalars, _toml_containers, max_leaves=8)


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    """A TOML literal, written independently of config.to_toml_value (which is under test)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_key(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    return v.isoformat()  # a date


def toml_document(doc: dict[str, Any]) -> str:
    tables = {k: v for k, v in doc.items() if k in config.SECTIONS and isinstance(v, dict)}
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if k not in tables]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


@st.composite
def field_value(draw: st.DrawFn, f: dataclasses.Field) -> Any:
    # Mostly valid, so that whole documents load often enough to check what they load to.
    if draw(st.integers(0, 9)) < 8:
        return draw(valid_value(f))
    return draw(toml_values | invalid_value(f, null=False))


@st.composite
def config_documents(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A TOML document as a dict, and for each mistake in it the text its error must hold."""
    doc: dict[str, Any] = {}
    wrong: list[str] = []
    if draw(st.booleans()):
        f = SECTION_FIELDS[None]["device_id"]
        doc["device_id"] = draw(field_value(f))
        if not accepts(f, doc["device_id"]):
            wrong.append("device_id")
    for section in draw(st.lists(st.sampled_from(config.SECTIONS), unique=True, max_size=4)):
        fields = SECTION_FIELDS[section]
        if draw(st.integers(0, 19)) == 0:
            doc[section] = draw(toml_scalars)
            wrong.append(f"[{section}]")
            continue
        table = {k: draw(field_value(fields[k])) for k in draw(st.lists(st.sampled_from(list(fields)), unique=True))}
        wrong += [f"{section}.{k}" for k, v in table.items() if not accepts(fields[k], v)]
        if draw(st.integers(0, 9)) == 0:
            key = draw(st.text(max_size=12).filter(lambda k, fields=fields: k not in fields))
            table[key] = draw(toml_values)
            wrong.append(repr(key))
        doc[section] = table
    if draw(st.integers(0, 19)) == 0:
        key = draw(st.text(max_size=12).filter(lambda k: k not in SECTION_FIELDS[None] and k not in config.SECTIONS))
        doc[key] = draw(toml_values)
        wrong.append(repr(key))
    return doc, wrong


# Fragments of config files: real keys and tables, and the numbers that strain a loader.
KEY_WORDS = sorted({k for fields in SECTION_FIELDS.values() for k in fields})
TOML_TOKENS = [
    *["[source]", "[mqtt]", "[loop]", "[spool]", "[[loop]]", "[nope]", "[mqtt.x]", "=", " = ", "\n", "#"],
    *['"', "'", "{", "}", "[", "]", ",", "."],
    *KEY_WORDS,
]
TOML_VALUES = [
    *["true", "nan", "inf", "-inf", "1e400", "0x10", "1_000", "-0", "0", "-3", "1.5", "1979-05-27", "[]", "{}"],
    *['""', '"x"', "'x'", "[1, 2]", "{a = 1}", "1 2", "9" * 4400],  # 4400 digits: past Python's int(str) limit
]
TOML_TOKENS += TOML_VALUES
toml_words = (
    st.sampled_from(TOML_TOKENS)
    | st.text(max_size=5)
    | st.integers().map(str)
    | huge_ints.map(str)
    | st.floats().map(repr)
)
# Documents of `key = value` lines under table headers: random tokens alone seldom make a line that a
# TOML parser reads as far as the value.
toml_lines = st.builds(
    "{} = {}\n".format,
    st.sampled_from(KEY_WORDS) | st.text("abc_-", min_size=1),
    st.sampled_from(TOML_VALUES) | huge_ints.map(str) | st.floats().map(repr) | texts.map(toml_key),
)
toml_headers = st.sampled_from([f"[{name}]\n" for name in (*config.SECTIONS, "nope", "mqtt.x")])
toml_like_text = st.lists(toml_words, max_size=30).map("".join) | st.lists(toml_lines | toml_headers).map("".join)


@settings(BASE, max_examples=1000)
@given(st.text() | toml_like_text)
def test_from_toml_of_any_text_gives_a_config_or_one_error_line(text: str) -> None:
    try:
        cfg = config.from_toml(text, "any.toml")
    except EdgecamError as exc:
        one_line(exc)
        assert str(exc).startswith("any.toml: "), str(exc)
    else:
        assert isinstance(cfg, Config)


@settings(BASE, max_examples=800)
@given(config_documents())
def test_from_toml_loads_valid_keys_and_names_each_bad_one(case: tuple[dict[str, Any], list[str]]) -> None:
    doc, wrong = case
    text = toml_document(doc)
    try:
        cfg = config.from_toml(text, "gen.toml")
    except EdgecamError as exc:
        assert wrong, f"a valid document was refused: {exc}\n{text}"
        msg = one_line(exc)
        assert any(named(w, msg) for w in wrong), f"{msg!r} names none of {wrong}"
        return
    assert not wrong, f"loaded despite {wrong}:\n{text}"
    expected = Config()
    for section, values in doc.items():
        target = getattr(expected, section) if section in config.SECTIONS else expected
        fields = SECTION_FIELDS[section if section in config.SECTIONS else None]
        items = values.items() if section in config.SECTIONS else [(section, values)]
        for key, value in items:
            setattr(target, key, as_field(fields[key], value))
    assert cfg == expected


@st.composite
def field_text(draw: st.DrawFn, f: dataclasses.Field) -> tuple[str, Any]:
    """A value as an environment variable or a flag writes it, and the value it means."""
    kind = field_kind(f)
    pad = draw(st.sampled_from(["", " ", "\t", " \n"]))
    if kind is bool:
        value = draw(st.booleans())
        word = draw(st.sampled_from(["1", "true", "yes", "on"] if value else ["0", "false", "no", "off"]))
        return pad + draw(st.sampled_from([word, word.upper(), word.title()])) + pad, value
    if kind is str:
        value = draw(valid_value(f))
        return value, value
    value = draw(valid_value(f))
    return pad + (repr(value) if isinstance(value, float) else str(value)) + pad, as_field(f, value)


env_noise = (
    st.text(max_size=20)
    | long_text
    | huge_ints.map(str)
    | st.floats().map(repr)
    | st.sampled_from(["", "nan", "inf", "-inf", "1e400", "0x10", "1_000", "١٢", "²", "true", "maybe", "5.0", "-1"])
)


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """EDGECAM_* variables: real ones with good values, real ones with noise, and names that mean nothing."""
    env = draw(
        st.dictionaries(
            st.from_regex(r"EDGECAM_[A-Z_]{0,24}", fullmatch=True) | st.text(max_size=10), env_noise, max_size=4
        )
    )
    good: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(ENV_FIELDS)), unique=True, max_size=8)):
        f = ENV_FIELDS[name][2]
        if draw(st.integers(0, 3)):
            env[name], good[name] = draw(field_text(f))
        else:
            env[name] = draw(env_noise)
    noisy = {n for n in ENV_FIELDS if n in env and n not in good}
    return env, good, noisy


def field_of(cfg: Config, name: str) -> Any:
    section, key, _ = ENV_FIELDS[name]
    return getattr(getattr(cfg, section) if section else cfg, key)


@settings(BASE, max_examples=800)
@given(environments())
def test_apply_env_sets_good_variables_and_names_a_bad_one(
    case: tuple[dict[str, str], dict[str, Any], set[str]],
) -> None:
    env, good, noisy = case
    cfg = Config()
    try:
        config.apply_env(cfg, env)
    except EdgecamError as exc:
        msg = one_line(exc)
        assert any(name in msg for name in noisy), f"{msg!r} names none of {sorted(noisy)}"
        return
    for name, value in good.items():
        assert field_of(cfg, name) == value and type(field_of(cfg, name)) is type(value), name
    for name in noisy:
        # Noise that happened to parse must still obey the declaration.
        assert accepts(ENV_FIELDS[name][2], field_of(cfg, name)), (name, env[name], field_of(cfg, name))


@settings(BASE, max_examples=200)
@given(
    st.binary(max_size=300)
    | toml_like_text.map(str.encode)
    | config_documents().map(lambda c: toml_document(c[0]).encode()),
    st.sampled_from(["file", "missing", "directory"]),
    st.booleans(),
    environments(),
)
def test_load_gives_a_config_or_one_error_line(
    content: bytes, kind: str, via_env: bool, case: tuple[dict[str, str], dict[str, Any], set[str]]
) -> None:
    env = dict(case[0])
    env.pop("EDGECAM_CONFIG", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edgecam.toml"
        if kind == "file":
            path.write_bytes(content)
        elif kind == "directory":
            path.mkdir()
        if via_env:
            env["EDGECAM_CONFIG"] = str(path)
        try:
            cfg, origin = config.load(None if via_env else path, env)
        except EdgecamError as exc:
            msg = one_line(exc)
            assert str(path) in msg or any(name in msg for name in case[2]), msg
            return
        assert kind == "file" and isinstance(cfg, Config) and origin == str(path)


@settings(BASE, max_examples=1000)
@given(
    st.sampled_from(sorted(ENV_FIELDS)).flatmap(
        lambda n: st.tuples(st.just(n), field_text(ENV_FIELDS[n][2]) | env_noise)
    )
)
def test_set_value_from_a_flag_gives_the_value_or_names_the_flag(case: tuple[str, Any]) -> None:
    name, given_value = case
    section, key, f = ENV_FIELDS[name]
    text, meant = given_value if isinstance(given_value, tuple) else (given_value, None)
    cfg = Config()
    try:
        config.set_value(cfg, f"{section}.{key}" if section else key, text, "--the-flag")
    except EdgecamError as exc:
        assert meant is None, f"refused {text!r}: {exc}"
        assert one_line(exc).startswith("--the-flag: ")
        return
    assert accepts(f, field_of(cfg, name))
    if isinstance(given_value, tuple):
        assert field_of(cfg, name) == meant


@st.composite
def valid_configs(draw: st.DrawFn, strings: st.SearchStrategy[str] | None = None) -> Config:
    """A Config whose every key holds a value its declaration allows (defaults for keys not drawn)."""
    cfg = Config()
    for section, fields in SECTION_FIELDS.items():
        target = getattr(cfg, section) if section else cfg
        for key, f in fields.items():
            if draw(st.booleans()):
                use = strings if strings is not None and field_kind(f) is str and not f.metadata["choices"] else None
                setattr(target, key, as_field(f, draw(use if use is not None else valid_value(f))))
    return cfg


# Paths as a user might give them: a real file, a missing one, and junk including names too long for the OS.
path_like = st.sampled_from(["", str(LABELS), "/nonexistent/x.pem", "relative.pem"]) | texts


@settings(BASE, max_examples=500)
@given(valid_configs(strings=path_like))
def test_validate_passes_or_names_a_key_in_one_line(cfg: Config) -> None:
    try:
        config.validate(cfg)
    except EdgecamError as exc:
        msg = one_line(exc)
        assert any(key in msg for key in KEY_NAMES), msg


@settings(BASE, max_examples=400)
@given(valid_configs())
def test_to_toml_then_from_toml_gives_the_same_config(cfg: Config) -> None:
    text = config.to_toml(cfg, redact=False)
    assert config.from_toml(text, "effective.toml") == cfg


# -- 3. the payload decoder, the result check and the dashboard's fleet state ---------------------------------

float32_maps = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=16),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@settings(BASE, max_examples=1000)
@given(float32_maps)
def test_decode_of_encode_is_within_one_quantization_step(cam: np.ndarray) -> None:
    back = decode_cam(encode_cam(cam))
    assert back.shape == cam.shape and back.dtype == np.float32
    lo, hi = float(cam.min()), float(cam.max())
    # One 8-bit step, plus min/max rounded to 6 decimals in the JSON, plus float32 arithmetic.
    tolerance = (hi - lo) / 255 + 1e-6 + 1e-6 * max(abs(lo), abs(hi))
    error = float(np.max(np.abs(back.astype(np.float64) - cam.astype(np.float64))))
    assert error <= tolerance, f"error {error} over {tolerance} for min {lo} max {hi}"


def encoded(pixels: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return buf.tobytes()


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h (checksums right) but carries next to no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


@st.composite
def images(draw: st.DrawFn, h: int, w: int) -> bytes:
    """Image bytes that are not the 8-bit h x w grayscale PNG the contract wants, or are by accident."""
    dh, dw = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    kind = draw(
        st.sampled_from(
            ["other size", "transposed", "color", "16-bit", "jpeg", "bmp", "truncated", "claims", "random", "empty"]
        )
    )
    gray = np.zeros((h, w), np.uint8)
    if kind == "other size":
        return encoded(np.zeros((dh, dw), np.uint8))
    if kind == "transposed":
        return encoded(gray.T.copy())
    if kind == "color":
        return encoded(np.zeros((h, w, 3), np.uint8))
    if kind == "16-bit":
        return encoded(np.zeros((h, w), np.uint16))
    if kind in ("jpeg", "bmp"):
        return encoded(gray, "." + ("jpg" if kind == "jpeg" else kind))
    if kind == "truncated":
        data = encoded(gray)
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "claims":
        return png_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    if kind == "random":
        return draw(st.binary(max_size=200))
    return b""


dimensions = (
    st.integers(-5, 40)
    | huge_ints
    | st.integers(2**31 - 1, 2**64)
    | st.floats()
    | st.booleans()
    | st.sampled_from(["7", "7.0", "0x7", " 7 ", ""])
    | st.none()
)


@st.composite
def broken_base64(draw: st.DrawFn, text: str) -> str:
    how = draw(st.sampled_from(["insert", "truncate", "unpad", "whitespace", "urlsafe"]))
    if how == "insert":
        at = draw(st.integers(0, len(text)))
        return (
            text[:at]
            + draw(st.characters(blacklist_characters=string.ascii_letters + string.digits + "+/="))
            + text[at:]
        )
    if how == "truncate":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "unpad":
        return text.rstrip("=")
    if how == "whitespace":
        return " " + text + "\n"
    return text.replace("+", "-").replace("/", "_")


@st.composite
def mutated_cams(draw: st.DrawFn) -> dict[str, Any]:
    """A real encoded map with a wrong image, or one to three things wrong with it."""
    cam = draw(
        hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=st.floats(-10, 10, width=32))
    )
    obj: dict[str, Any] = encode_cam(cam)
    h, w = cam.shape
    if draw(st.booleans()):
        # Only the image wrong, so that the decoder gets as far as decoding it.
        obj["png"] = base64.b64encode(draw(images(h, w))).decode("ascii")
        return obj
    for _ in range(draw(st.integers(1, 3))):
        # The png is where a decoder meets outside code (base64, libpng): it gets the most mutations.
        key = draw(st.sampled_from(["w", "h", "min", "max", "png", "png"]))
        how = draw(st.sampled_from(["drop", "replace", "stringify", "special", "special"]))
        if how == "drop":
            obj.pop(key, None)
        elif how == "replace":
            obj[key] = draw(json_values)
        elif how == "stringify" and key in obj:
            obj[key] = str(obj[key])
        elif key in ("w", "h"):
            obj[key] = draw(dimensions)
        elif key in ("min", "max"):
            obj[key] = draw(st.floats() | huge_ints | st.sampled_from(["nan", "inf", "-1e400", "1e400"]))
        elif draw(st.integers(0, 2)) == 0 and isinstance(obj.get("png"), str):
            obj["png"] = draw(broken_base64(obj["png"]))
        else:
            obj["png"] = base64.b64encode(draw(images(h, w))).decode("ascii")
    return obj


def decode_or_error(obj: Any) -> np.ndarray | PayloadError:
    try:
        return decode_cam(obj)
    except PayloadError as exc:
        one_line(exc)
        return exc


@settings(BASE, max_examples=800)
@given(mutated_cams())
def test_decode_cam_of_a_damaged_map_gives_the_map_or_a_payload_error(obj: dict[str, Any]) -> None:
    out = decode_or_error(obj)
    if isinstance(out, np.ndarray):
        # Whatever decodes is the shape the object says, so a consumer can trust w and h.
        assert out.dtype == np.float32 and out.shape == (int(obj["h"]), int(obj["w"]))


@settings(BASE, max_examples=500)
@given(json_values | st.dictionaries(st.sampled_from(["w", "h", "min", "max", "png"]), json_values))
def test_decode_cam_of_any_value_gives_a_map_or_a_payload_error(obj: Any) -> None:
    decode_or_error(obj)


T0 = 1_780_000_000.0
VALID_MAPS = [np.linspace(-2, 5, 49, dtype=np.float32).reshape(7, 7), np.eye(3, 5, dtype=np.float32)]


def valid_result(device: str, seq: int = 1, cam: np.ndarray = VALID_MAPS[0]) -> bytes:
    return result_payload(
        device=device,
        boot="9f2c41d0",
        seq=seq,
        ts=T0 + seq,
        model="tf2_mobilenet_v2_1.0_224_ptq",
        top=[(20, "chickadee", 0.8633), (19, "magpie", 0.0312)],
        cam_id=20,
        cam_label="chickadee",
        cam=cam,
        timing_ms={"pre": 0.61, "infer": 2.0, "total": 2.71},
        extra_cams=[(19, "magpie", VALID_MAPS[1])],
    )


# Every damaged result starts from what `edgecam run` publishes.
_RESULT = json.loads(valid_result("cam-1"))


def result_object(device: str, seq: int) -> dict[str, Any]:
    """A valid result of that device, as parsed JSON."""
    return {**copy.deepcopy(_RESULT), "device": device, "seq": seq}


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value, the value itself included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


def at(obj: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        obj = obj[step]
    return obj


@st.composite
def mutated_results(draw: st.DrawFn, device: str = "cam-1") -> dict[str, Any]:
    """A real result with one to four of its parts dropped, replaced, retyped, pushed to extremes or damaged."""
    obj = result_object(device, draw(st.integers(0, 10**6)))
    # Mostly a single mistake: with several, the first one found hides what the others would reach.
    for _ in range(weighted(draw, (3, st.just(1)), (1, st.integers(2, 4)))):
        if not isinstance(obj, dict):
            break
        how = draw(st.sampled_from(["drop", "replace", "retype", "extreme", "cam"]))
        if how == "cam":
            obj["cam"] = draw(mutated_cams())
            continue
        candidates = paths(obj)
        if how == "extreme":
            candidates = [p for p in candidates if type(at(obj, p)) in (int, float)] or candidates
        path = draw(st.sampled_from(candidates))
        if not path:
            obj = draw(json_values) if how == "replace" else obj
            continue
        parent, last = at(obj, path[:-1]), path[-1]
        if how == "drop":
            del parent[last]
        elif how == "replace":
            parent[last] = draw(json_values)
        elif how == "extreme":
            # JSON numbers have no size limit; NaN and Infinity are what Python itself writes.
            parent[last] = draw(huge_ints | st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -1e308, -0.0]))
        else:
            value = parent[last]
            parent[last] = str(value) if not isinstance(value, str) else draw(st.integers() | st.floats() | st.none())
    return obj


@settings(BASE, max_examples=800)
@given(mutated_results() | json_values)
def test_check_result_passes_a_result_or_raises_payload_error(obj: Any) -> None:
    try:
        out = check_result(obj)
    except PayloadError as exc:
        one_line(exc)
        return
    # What passes is what result_line and the fleet rely on without checking again.
    assert out is obj and obj["v"] == 1 and not isinstance(obj["v"], bool)
    assert {"device", "seq", "top", "cam"} <= obj.keys() and isinstance(obj["cam"], dict)
    assert obj["top"] and all(isinstance(t["label"], str) and type(t["score"]) in (int, float) for t in obj["top"])


DEVICES = ["cam-1", "cam-2", "pi.kitchen"]
# Results carry the most structure, so they get twice the share of any other kind.
KINDS = ["result", "result", "status", "stats", "overlay"]


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A topic, mostly of ours, and a payload: noise, JSON, or a damaged or valid message of that kind."""
    dev = weighted(
        draw,
        (7, st.sampled_from(DEVICES)),
        (2, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,70}", fullmatch=True)),
        (1, st.text(max_size=8)),
    )
    kind = weighted(draw, (9, st.sampled_from(KINDS)), (1, st.text(max_size=8)))
    topic = weighted(
        draw, (17, st.just(f"edgecam/{dev}/{kind}")), (2, st.just(f"other/{dev}/{kind}")), (1, st.text(max_size=30))
    )
    stats = st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1.0, True, 2]), "device": st.sampled_from([dev, "cam-1"])},
        optional=dict.fromkeys(["fps", "state", "reason", "timing_ms", "model", "boot"], json_values),
    )
    damaged = st.sampled_from([dev, dev, "cam-1"]).flatmap(mutated_results)
    valid = st.builds(result_object, st.just(dev), st.integers(0, 100))
    # Mostly a payload of the topic's kind, so that the checks behind the first one get exercised too.
    of_kind = {
        "result": st.one_of(damaged, damaged, valid).map(dumps),
        "stats": stats.map(dumps),
        "status": st.sampled_from([b"online", b"degraded", b"offline", b" online\n", b"ONLINE", b""]),
        "overlay": st.binary(max_size=100).map(lambda b: b"\xff\xd8" + b),
    }
    payload = weighted(
        draw,
        (2, st.binary(max_size=300)),
        (2, json_values.map(dumps)),
        (2, nested_payloads(60_000)),
        (2, st.sampled_from(list(of_kind.values())).flatmap(lambda strategy: strategy)),
        (8, of_kind.get(kind, st.binary(max_size=30))),
    )
    return topic, payload


def state(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {dev: copy.deepcopy(vars(d)) for dev, d in fleet.devices.items()}


@settings(BASE, max_examples=400)
@given(st.lists(messages(), min_size=1, max_size=6))
def test_fleet_ingest_never_raises_and_changes_only_the_device_it_accepts(batch: list[tuple[str, bytes]]) -> None:
    fleet = Fleet()
    for i, (topic, payload) in enumerate(
        [
            ("edgecam/cam-1/status", b"online"),
            ("edgecam/cam-1/result", valid_result("cam-1")),
            ("edgecam/cam-1/stats", dumps({"v": 1, "device": "cam-1", "fps": 2.0, "state": "ok"})),
            ("edgecam/cam-1/overlay", encoded(np.zeros((8, 8, 3), np.uint8), ".jpg")),
        ]
    ):
        assert fleet.ingest(topic, payload, T0 + i) == "cam-1"
    for i, (topic, payload) in enumerate(batch):
        before = state(fleet)
        changed = fleet.ingest(topic, payload, T0 + 10 + i)
        after = state(fleet)
        # A message may change its own device and nothing else; a refused one changes nothing at all.
        for dev in before.keys() | after.keys():
            if dev != changed:
                assert before.get(dev) == after.get(dev), f"{topic!r} changed {dev}"
        if changed is not None:
            assert topic.split("/")[1] == changed
        # The dashboard serves this to a browser, whose JSON.parse takes no NaN and no Infinity.
        json.dumps(fleet.snapshot(T0 + 20, 30.0), allow_nan=False)


# -- what these properties found, kept as plain examples ----------------------------------------------
# Each was a crash or a broken message before it was fixed; hypothesis may not draw them again after an
# upgrade changes its generation, so they stay here by name.

_HUGE = "1" + "0" * 309  # an integer past the float range, still under Python's 4300-digit limit


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 1000,  # RecursionError escaped json.loads
        b'{"cmd":"set","max_fps":' + _HUGE.encode() + b"}",  # OverflowError in float()
        b'{"cmd":"explain","class":"' + b"x" * 300 + b'"}',  # the class echoed whole
        b'{"cmd":"explain","class":1' + b"0" * 300 + b"}",
        b'{"cmd":"set","publish":"' + b"x" * 300 + b'"}',
        ('{"cmd":"' + "\U00018d09" * 40 + '"}').encode(),  # cut before repr, which then grew tenfold
    ],
)
def test_found_commands(payload: bytes) -> None:
    with pytest.raises(CommandError) as info:
        parse(payload, NAMES)
    one_line(info.value, short=True)


@pytest.mark.parametrize(
    "text",
    ["[source]\nfps = " + _HUGE, "x = 1" + "0" * 4300, "a = " + "[" * 2000],
)
def test_found_config_documents(text: str) -> None:
    with pytest.raises(EdgecamError) as info:
        config.from_toml(text, "c.toml")
    assert one_line(info.value).startswith("c.toml: ")


@pytest.mark.parametrize(
    ("key", "value"), [("ca_file", "a" * 256), ("key_file", "a\nb"), ("password_file", "nul\x00byte")]
)
def test_found_config_paths(key: str, value: str) -> None:
    cfg = Config()
    setattr(cfg.mqtt, key, value)
    if key == "key_file":
        cfg.mqtt.cert_file = __file__
    with pytest.raises(EdgecamError) as info:
        config.validate(cfg)
    assert one_line(info.value).startswith(f"mqtt.{key}: ")


@pytest.mark.parametrize("device", ["\x1f", "a\nb = 1"])
def test_found_device_ids(device: str) -> None:
    cfg = Config()
    cfg.device_id = device
    with pytest.raises(EdgecamError) as info:
        config.validate(cfg)
    assert one_line(info.value).startswith("device_id: ")
    # config check prints the effective configuration even so: it must stay valid TOML.
    assert config.from_toml(config.to_toml(cfg, redact=False), "check").device_id == device


def test_found_maps_far_from_zero_survive_the_round_trip() -> None:
    for cam in (np.array([[1.3344407e36, 0]], np.float32), np.array([[3e38, -3e38]], np.float32)):
        got = decode_cam(encode_cam(cam))
        assert np.all(np.isfinite(got))
        assert np.max(np.abs(got - cam)) <= (float(cam.max()) - float(cam.min())) / 255 * 0.51


def _good_cam() -> dict[str, Any]:
    return encode_cam(np.arange(49, dtype=np.float32).reshape(7, 7))


@pytest.mark.parametrize(
    "change",
    [
        {"min": int(_HUGE)},
        {"w": float("inf")},
        {"w": "7"},
        {"h": 7.9},
        {"min": float("nan")},
        {"png": ""},
        {"png": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode()},
    ],
)
def test_found_damaged_maps(change: dict[str, Any]) -> None:
    with pytest.raises(PayloadError) as info:
        decode_cam({**_good_cam(), **change})
    one_line(info.value)


def test_found_fleet_messages_are_refused_not_raised() -> None:
    fleet = Fleet()
    good = result_payload(
        device="cam-1", boot="b", seq=1, ts=0.0, model="m", top=[(1, "a", 0.5)], cam_id=1, cam_label="a",
        cam=np.ones((7, 7), np.float32), timing_ms={"total": 1.0},
    )
    assert fleet.ingest("edgecam/cam-1/result", good, 0.0) == "cam-1"
    before = json.dumps(fleet.snapshot(1.0, 60)["devices"])
    deep = b"[" * 1000
    huge_score = json.loads(good)
    huge_score["top"][0]["score"] = int(_HUGE)
    for topic, payload in [
        ("edgecam/cam-1/result", deep),
        ("edgecam/cam-1/stats", deep),
        ("edgecam/cam-1/result", json.dumps(huge_score).encode()),
    ]:
        assert fleet.ingest(topic, payload, 0.5) is None
    assert json.dumps(fleet.snapshot(1.0, 60)["devices"]) == before
    assert fleet.bad == 3
