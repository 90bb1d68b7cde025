"""How a run reports what it skipped or doubts: one `warning:` line on stderr, long lists cut short."""

import sys

__all__ = ["listed", "warn"]

_SHOW_UNREADABLE = 10  # files listed by name in the once-per-dataset report


def listed(items: list[tuple[str, str]]) -> str:
    """`a (why); b (why); and M more` for a warning: the first `_SHOW_UNREADABLE` (path, reason) pairs by name."""
    shown = "; ".join(f"{path} ({reason})" for path, reason in items[:_SHOW_UNREADABLE])
    more = f"; and {len(items) - _SHOW_UNREADABLE} more" if len(items) > _SHOW_UNREADABLE else ""
    return shown + more


def warn(message: str) -> None:
    """A `warning:` line on stderr (rank 0's reports about the data and settings)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
