"""The one exception type that reaches the user as a single line."""


class EdgecamError(Exception):
    """A problem with the user's input (file, model, config, command).

    The message names what is wrong and where; the CLI prints it as one line
    and exits non-zero, with no traceback.
    """


def shown(value: object, limit: int = 40) -> str:
    """A value for an error line: its repr (escapes keep it on one line), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escaped(text: str) -> str:
    """Text safe to write to a terminal: every character that is not printable (C0 and C1 controls such
    as ESC, BEL and CR, bidi overrides, line separators) as a \\x, \\u or \\U escape."""
    return "".join(c if c.isprintable() else _escape(ord(c)) for c in text)


def _escape(n: int) -> str:
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
