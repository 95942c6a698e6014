"""The one exception type for user mistakes: the CLI prints its message as one line and exits non-zero."""


class BitconvertError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""
