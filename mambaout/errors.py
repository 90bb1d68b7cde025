"""The one exception type for mistakes a user can make (bad path, bad checkpoint, bad name, bad flag).

The CLI catches it at the edge and prints its message as one line; anything else is a bug and raises normally.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the thing and what to do."""
