"""Which committed checkpoints are kept: the newest few plus every M-th step."""

from __future__ import annotations

from crucible.cluster.storage import Location
from crucible.jobs.train.checkpoint.layout import (
    MANIFEST,
    STEP_NAME,
    TMP_NAME,
    UNIVERSAL,
    committed_steps,
    step_path,
)


def retain(root: Location, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete committed checkpoints that the policy does not keep; return the deleted steps.

    Kept: the newest ``keep_last``, plus every step that is a multiple of ``keep_every``.
    Leftovers of older unfinished saves are removed too. A checkpoint's manifest goes first,
    so a deletion cut short never leaves something that looks committed.

    Args:
        root: the checkpoints directory.
        keep_last: newest checkpoints kept.
        keep_every: also keep steps divisible by this (None: none).
    """
    steps = committed_steps(root)
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    newest = steps[-1] if steps else -1
    deleted = []
    for s in steps:
        if s not in keep:
            for d in (step_path(root, s), root / UNIVERSAL / f"step-{s}"):
                (d / MANIFEST).rm()
                d.rmtree()
            deleted.append(s)
    for name in root.ls():
        m = TMP_NAME.match(name) or STEP_NAME.match(name)
        if m and int(m.group(1)) < newest and int(m.group(1)) not in steps:
            (root / name).rmtree()  # an unfinished save older than the newest commit
    return deleted
