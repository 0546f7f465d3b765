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
