"""The one contract every data executor implements, and the stages it runs.

A :class:`Stage` is a named piece of the pipeline (filter the parts, exact dedup, fuzzy
dedup, finalise the parts, build the shards) written once against the primitives below. An
:class:`Executor` runs any list of stages and knows none by name: it supplies the primitives,

- tasks: a function on each of a list of small JSON-able items, one task each (per part);
- datasets of batches (a batch is a ``{column: numpy array}`` dict or a ``pyarrow.Table``):
  read Parquet columns, map a function over batches, shuffle (hash-partition by key columns
  and hand each partition of complete groups to a reduce function), union, count, collect,
  and write partitioned by input part.

The in-process executor (:mod:`.local`) runs each primitive over the whole data in this
process; the Ray executor (:mod:`.ray`) runs it on Ray Data with bounded memory per task.
Steps and stages never import Ray; only executors (and job entry points) do.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from crucible.cluster.storage import Location

BatchFormat = Literal["numpy", "pyarrow"]
Batch = Any  # dict[str, np.ndarray] (numpy) or pyarrow.Table (pyarrow)
Dataset = Any  # an executor's handle on a distributed (or in-memory) set of batches


class Stage(abc.ABC):
    """A named piece of the pipeline, written against :class:`Executor`'s primitives only.

    A stage owns its completion markers: run again after it finished, it does nothing.
    """

    name = "stage"

    @abc.abstractmethod
    def run(self, ex: Executor) -> dict[str, Any]:
        """Do (or skip, when already done) the stage's work on ``ex``; its statistics."""


class Executor(abc.ABC):
    """Runs stages; every stage reaches the executor through these primitives only."""

    name = "executor"

    def run(self, stages: Sequence[Stage]) -> dict[str, Any]:
        """Run ``stages`` in order.

        Args:
            stages: any stages.

        Returns:
            ``{stage name: its statistics}``.
        """
        return {stage.name: stage.run(self) for stage in stages}

    @abc.abstractmethod
    def run_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """``fn`` on each item (a JSON-able dict), one task each.

        Args:
            items: the tasks' inputs.
            fn: item -> a JSON-able dict (a module-level function or a partial of one).

        Returns:
            ``(item index, result)`` pairs as tasks finish, in any order.
        """

    @abc.abstractmethod
    def read_parquet(self, files: Sequence[Location], columns: list[str]) -> Dataset:
        """``columns`` of Parquet ``files`` as numpy batches (list columns as 2-D arrays)."""

    @abc.abstractmethod
    def from_tasks(
        self, items: Sequence[dict[str, Any]], fn: Callable[[dict[str, Any]], Batch]
    ) -> Dataset:
        """The batches ``fn`` makes of each item (one task each), in ``pyarrow`` format."""

    @abc.abstractmethod
    def from_batch(self, batch: dict[str, Any]) -> Dataset:
        """A dataset of one in-memory numpy batch (small data: tests, edges handed in)."""

    @abc.abstractmethod
    def map_batches(
        self,
        ds: Dataset,
        fn: Callable[[Batch], Batch],
        batch_format: BatchFormat = "numpy",
        out_row_bytes: int | None = None,
    ) -> Dataset:
        """``fn`` on every batch of ``ds``.

        Args:
            ds: the input.
            fn: a batch -> a batch; any batching of the rows gives the same rows overall.
            batch_format: the batches' form.
            out_row_bytes: bytes of output per input row, when ``fn`` multiplies rows: the
                executor sizes input batches so an output batch stays one block.
        """

    @abc.abstractmethod
    def shuffle(
        self,
        ds: Dataset,
        keys: list[str],
        fn: Callable[[Batch], Batch],
        nbytes: int = 0,
        partitions: int | None = None,
        batch_format: BatchFormat = "numpy",
    ) -> Dataset:
        """Hash-partition ``ds`` by ``keys``; ``fn`` on each partition (complete groups).

        Args:
            ds: the input.
            keys: the grouping columns.
            fn: a batch of complete groups, in any order -> a batch of result rows.
            nbytes: about how many bytes are shuffled (sets the partition count where the
                executor bounds a task's memory).
            partitions: at most this many partitions (e.g. one per output file); given with
                ``nbytes``, fewer when the data fits in fewer tasks' budgets.
            batch_format: the batches' form.
        """

    @abc.abstractmethod
    def union(self, a: Dataset, b: Dataset) -> Dataset:
        """The rows of ``a`` and of ``b``."""

    @abc.abstractmethod
    def materialize(self, ds: Dataset) -> Dataset:
        """``ds`` computed once, so that using it again does not recompute it."""

    @abc.abstractmethod
    def count(self, ds: Dataset) -> int:
        """Rows of ``ds``."""

    @abc.abstractmethod
    def take_all(self, ds: Dataset) -> list[dict[str, Any]]:
        """Every row of ``ds`` on the driver (small results only)."""

    @abc.abstractmethod
    def write_by_part(self, ds: Dataset, out: Location) -> None:
        """Rows of ``ds`` (with a ``key`` column) as Parquet under the new directory ``out``,
        hive-partitioned by the input part each key comes from (``part=<p>/``)."""
