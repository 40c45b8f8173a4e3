"""The dedup stages over every filtered part: exact (:mod:`~crucible.data_pipeline.dedup.exact`)
and MinHash (:mod:`~crucible.data_pipeline.dedup.fuzzy`).

Each attempt writes a fresh result directory, which the stage's marker (written last) names;
a directory the marker does not name is an interrupted attempt's leftovers, removed on the
next run.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from crucible.cluster.storage import Location
from crucible.data_pipeline.dedup.exact import exact_dedup
from crucible.data_pipeline.dedup.fuzzy import fuzzy_dedup
from crucible.data_pipeline.executors.base import Executor, Stage
from crucible.data_pipeline.run_dir import part_name, read_marker, work_paths
from crucible.data_pipeline.spec import DataSpec

Find = Callable[[Executor, Sequence[Location], Location], dict[str, Any]]


class DedupStage(Stage):
    """``find`` over every filtered part, its result committed by the stage's marker."""

    def __init__(self, name: str, run_dir: Location, num_parts: int, find: Find) -> None:
        """A dedup stage.

        Args:
            name: ``exact`` or ``minhash``: names the marker and the result directories.
            run_dir: the run directory.
            num_parts: the number of input parts.
            find: ``(executor, filtered files, new result directory)`` -> statistics.
        """
        self.name = name
        self.paths = work_paths(run_dir)
        self.num_parts = num_parts
        self.find = find

    def run(self, ex: Executor) -> dict[str, Any]:
        """Find the duplicates unless a committed result exists; its statistics."""
        dedup = self.paths["dedup"]
        marker = dedup / f"{self.name}.json"
        s = read_marker(marker)
        if s is not None and "result" not in s:
            s = None  # not written by this protocol: redo
        for old in dedup.glob(f"{self.name}-*"):
            if s is None or old.name != s.get("result"):
                old.rmtree()
        if s is None:
            out_dir = dedup / f"{self.name}-{uuid.uuid4().hex[:12]}"
            files = [self.paths["filtered"] / part_name(i) for i in range(self.num_parts)]
            s = self.find(ex, files, out_dir)
            s["result"] = out_dir.name
            marker.write_json(s)
        return {k: v for k, v in s.items() if k != "result"}


def dedup_stages(spec: DataSpec, run_dir: Location, num_parts: int) -> list[DedupStage]:
    """The enabled dedup stages, exact first."""
    stages = []
    if spec.dedup.exact.enabled:
        stages.append(DedupStage("exact", run_dir, num_parts, exact_dedup))
    if spec.dedup.minhash.enabled:
        find = functools.partial(fuzzy_dedup, mh=spec.dedup.minhash)
        stages.append(DedupStage("minhash", run_dir, num_parts, find))
    return stages
