"""The data pipeline's Prometheus metrics: ``crucible_data_*`` counters exported from the
pipeline's cumulative per-step statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from crucible.monitoring.safe import never_raise


class DataMetrics(Collector):
    """The data pipeline's counters, exported from its cumulative per-step statistics.

    The pipeline already merges ``{step: StepStats.to_dict()}`` as parts finish; passing
    that mapping to :meth:`update` makes it the exported state (counters never go down:
    the pipeline's totals only grow).

    Args:
        registry: where to register (default: a fresh registry, as ``.registry``).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._steps: dict[str, Any] = {}
        self._dedup: dict[str, float] = {}
        self._updated = 0.0
        self.registry.register(self)

    @never_raise
    def update(self, step_stats: dict[str, Any]) -> None:
        """Replace the exported totals with the pipeline's merged per-step stats.

        Args:
            step_stats: ``{step name: {"docs_in", "docs_out", "bytes_in", "bytes_out",
                "dropped": {rule: n}}}``; extra keys are ignored.
        """
        self._steps = {str(k): dict(v) for k, v in step_stats.items() if isinstance(v, dict)}
        self._updated = time.time()

    @never_raise
    def on_dedup(self, duplicates: int, cluster_sizes: dict[Any, int]) -> None:
        """Record fuzzy-dedup results.

        Args:
            duplicates: documents that are members of a duplicate cluster.
            cluster_sizes: ``{cluster size: number of clusters}``.
        """
        self._dedup = {
            "clusters": float(sum(cluster_sizes.values())),
            "duplicates": float(duplicates),
        }
        self._updated = time.time()

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Yield the ``crucible_data_*`` families from the last update."""
        fams = {
            key: CounterMetricFamily(f"crucible_data_{name}", doc, labels=["stage"])
            for key, name, doc in [
                ("docs_in", "documents_in", "Documents entering a pipeline step."),
                ("docs_out", "documents_out", "Documents leaving a pipeline step."),
                ("bytes_in", "bytes_in", "Text bytes entering a pipeline step."),
                ("bytes_out", "bytes_out", "Text bytes leaving a pipeline step."),
            ]
        }
        drops = CounterMetricFamily(
            "crucible_data_dropped_documents", "Documents dropped, by step and rule.",
            labels=["stage", "rule"],
        )  # fmt: skip
        for stage, s in self._steps.items():
            for key, fam in fams.items():
                fam.add_metric([stage], float(s.get(key, 0)))
            for rule, n in (s.get("dropped") or {}).items():
                drops.add_metric([stage, str(rule)], float(n))
        yield from fams.values()
        yield drops
        if self._dedup:
            yield GaugeMetricFamily(
                "crucible_data_duplicate_clusters", "Near-duplicate clusters found.",
                value=self._dedup["clusters"],
            )  # fmt: skip
            yield GaugeMetricFamily(
                "crucible_data_duplicate_documents", "Documents in near-duplicate clusters.",
                value=self._dedup["duplicates"],
            )  # fmt: skip
        if self._updated:
            yield GaugeMetricFamily(
                "crucible_data_last_update_timestamp_seconds", "Unix time of the last update.",
                value=self._updated,
            )  # fmt: skip
