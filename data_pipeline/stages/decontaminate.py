"""The decontamination stage: eval-set n-grams joined with every filtered part's (a shuffle by
n-gram hash, :mod:`~crucible.data_pipeline.decontam.overlap`), committed like a dedup result;
the finalise stage drops (or marks) the matched documents part by part
(:mod:`~crucible.data_pipeline.decontam.apply`)."""

from __future__ import annotations

import functools

from crucible.cluster.storage import Location
from crucible.data_pipeline.decontam.apply import STEP
from crucible.data_pipeline.decontam.eval_sets import eval_files
from crucible.data_pipeline.decontam.overlap import find_overlaps
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages.dedup import DedupStage


def decontaminate_stages(spec: DataSpec, run_dir: Location, num_parts: int) -> list[DedupStage]:
    """The decontamination stage when the spec names eval sets (their files are found now, so a
    wrong path fails before any work).

    Args:
        spec: the data spec.
        run_dir: the run directory.
        num_parts: the number of input parts.

    Raises:
        CrucibleError: an eval set's path matches no file.
    """
    dc = spec.decontaminate
    if not dc.enabled:
        return []
    find = functools.partial(find_overlaps, dc=dc, eval_files=eval_files(dc))
    return [DedupStage(STEP, run_dir, num_parts, find)]
