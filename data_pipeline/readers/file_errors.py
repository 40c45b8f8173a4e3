"""File-level failures (an empty file, corrupt or truncated compressed data, a bad Parquet
file): counted as ``files/<kind>`` in the read step's counters, apart from documents, and named
in a logged warning as they happen (the first :data:`MAX_WARNINGS` per process)."""

from __future__ import annotations

import logging

from crucible.data_pipeline.document_step import StepStats

log = logging.getLogger(__name__)

MAX_WARNINGS = 20
_shown = 0


def warn(message: str) -> None:
    """Log ``message`` as a warning, unless :data:`MAX_WARNINGS` were logged already."""
    global _shown
    _shown += 1
    if _shown <= MAX_WARNINGS:
        log.warning("%s", message)
    elif _shown == MAX_WARNINGS + 1:
        log.warning(
            "more input-file warnings are not shown; the read step's counters "
            "(files/*, format_mismatch) count them all"
        )


def file_failed(stats: StepStats, path: str, kind: str, why: str) -> None:
    """Count a failure of the whole file ``path`` as ``files/<kind>`` and name it in a warning.

    Args:
        stats: the reader's counters.
        path: the file.
        kind: ``empty``, ``corrupt`` or ``truncated``.
        why: what is wrong, for the warning.
    """
    stats.counters[f"files/{kind}"] += 1
    warn(f"input {path}: {why}")
