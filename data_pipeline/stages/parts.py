"""A stage of one task per input part, each writing its outputs and then its marker; parts
with a marker are done and only their statistics are read back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from crucible.cluster.storage import Location
from crucible.data_pipeline.document_step import merge_stats
from crucible.data_pipeline.executors.base import Executor, Stage
from crucible.data_pipeline.progress import Progress, step_counts
from crucible.data_pipeline.run_dir import marker_name, read_marker


class PartStage(Stage):
    """``task`` on every part whose marker is missing; the parts' statistics summed."""

    def __init__(
        self,
        name: str,
        items: list[dict[str, Any]],
        task: Callable[[dict[str, Any]], dict[str, Any]],
        marker_dir: Location,
        progress: bool = False,
        on_part: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """A per-part stage.

        Args:
            name: the stage's name.
            items: one task input per part, each with its ``part``.
            task: item -> the part's statistics (it writes the part's marker, last).
            marker_dir: where the parts' markers are.
            progress: show the stage's progress (:class:`~crucible.data_pipeline.progress.Progress`).
            on_part: called with the statistics so far after each part.
        """
        self.name = name
        self.items = items
        self.task = task
        self.marker_dir = marker_dir
        self.progress = progress
        self.on_part = on_part

    def run(self, ex: Executor) -> dict[str, Any]:
        """Run the missing parts on ``ex``; every part's statistics, summed."""
        stats: dict[str, Any] = {}
        todo = []
        for item in self.items:
            done = read_marker(self.marker_dir / marker_name(int(item["part"])))
            if done is not None:
                stats = merge_stats(stats, done)
            else:
                todo.append(item)
        with Progress(self.name, len(self.items), enabled=self.progress) as bar:
            docs, nbytes, _ = step_counts(stats)
            bar.skip(len(self.items) - len(todo), docs, nbytes)
            for _, part_stats in ex.run_tasks(todo, self.task):
                stats = merge_stats(stats, part_stats)
                docs, nbytes, steps = step_counts(stats)
                bar.update(1, docs, nbytes, steps)
                if self.on_part is not None:
                    self.on_part(stats)
        return stats
