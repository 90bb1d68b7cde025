"""The one exception type for mistakes a user can make (bad path, bad checkpoint, bad name, bad flag).

The CLI catches it at the edge and prints its message as one line; anything else is a bug and raises normally.
"""

__all__ = ["UserError", "describe", "one_line"]


class UserError(Exception):
    """A problem the user can fix; the message names the thing and what to do."""


def one_line(text: str, limit: int = 200) -> str:
    """`text` with its whitespace runs (newlines included) collapsed, cut to `limit` characters with '...'.

    Messages echo what a user gave (a flag's value, a file's key); a huge or multi-line value must not flood them.
    """
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException, limit: int = 200) -> str:
    """`Type: message` of an exception on one line, shortened."""
    return one_line(f"{type(error).__name__}: {error}", limit)
