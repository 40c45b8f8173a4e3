"""Lines in the train job's log, written by rank 0 (and by any rank with a warning)."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """A line in the job log (bypasses Ray Train's print patch, which would log it twice).

    Args:
        message: the line, without its newline.
    """
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
