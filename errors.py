"""The one exception type for user errors.

Anything a user can fix (a bad spec, a port already taken, a missing binary) raises
:class:`CrucibleError` with a one-line message that says what is wrong and what to do. The
CLI prints it without a traceback and exits non-zero; everything else is a bug and keeps
its traceback.
"""


class CrucibleError(Exception):
    """A user error: the message is one line, says what is wrong and what to do."""

    exit_code = 2
