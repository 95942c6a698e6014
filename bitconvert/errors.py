"""The one exception type for user mistakes: the CLI prints its message as one line and exits non-zero."""


class BitconvertError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


def reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
