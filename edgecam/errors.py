"""The one exception type that reaches the user as a single line."""


class EdgecamError(Exception):
    """A problem with the user's input (file, model, config, command).

    The message names what is wrong and where; the CLI prints it as one line
    and exits non-zero, with no traceback.
    """
