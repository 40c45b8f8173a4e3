"""Ray Train internals: the logger of ``ray.train.report``.

Ray Train (2.50–2.60) logs every ``ray.train.report`` at INFO from a logger named by its
module's file path, which no public setting reaches (``RunConfig.logging_config`` filters
``ray.train.*`` loggers only). A report carries the whole step record, once per checkpoint
and rank; the step line in the job log already says it all.
"""

from __future__ import annotations

import contextlib
import logging

SUPPORTED = ("2.50", "2.61")
"""Ray versions this adapter is written against: at least the first, below the second."""


def quiet_report_log() -> None:
    """Raise the report logger to WARNING; with another Ray, leave it as it is."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
