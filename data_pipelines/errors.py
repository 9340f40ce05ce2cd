"""How command-line tools report a mistake the user can fix: one line on stderr, exit status 2.

Errors a user can cause (a bad config value, a missing file, shards that do not match) are raised
as ``ValueError`` or ``OSError`` with a message that says what to change; the tools catch exactly
these and print that message instead of a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def user_error_line(error: BaseException) -> str:
    """The one line that reports ``error``: ``error: <message>``."""
    message = str(error)
    # A DataLoader worker's error reaches the main process with the worker's traceback in its
    # message; its last line holds the original message.
    if "\nOriginal Traceback (most recent call last):" in message:
        message = message.rstrip().splitlines()[-1].partition(": ")[2] + " (in a DataLoader worker)"
    return f"error: {message}"


def report_user_error(error: BaseException) -> int:
    """Prints ``error: <message>`` to stderr and returns the exit status for it."""
    print(user_error_line(error), file=sys.stderr)
    return 2
