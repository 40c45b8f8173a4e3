"""The data pipeline: raw inputs to clean documents, exclusions, stats and training shards,
as a list of stages run by one executor (in-process or Ray).

Stages, each resumable (each output file published whole, a marker written last; nothing
relies on renaming a directory, so the same stages run on object stores):
1. filter    one task per input part: read -> normalise -> language -> quality -> PII,
             plus each survivor's exact-text hash and MinHash band keys;
2. exact     global exact dedup (a shuffle by text hash);
3. minhash   LSH buckets -> verified edges -> distributed connected components;
4. decontaminate (when eval sets are given) eval-set n-grams joined with the documents'
             (a shuffle by n-gram hash);
5. finalize  per part: drop duplicates and contaminated documents, write documents/ and
             exclusions/ (and decontamination/, the audit of every contaminated document);
then stats.json and documents/_SUCCESS, last; then the shard stage (tokenize -> pack ->
shuffle -> shards + manifest) when the spec asks for shards. A finished run started again
does nothing.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from crucible.cluster.storage import Location, check_storage
from crucible.config import spec_hash
from crucible.data_pipeline.document_step import merge_stats
from crucible.data_pipeline.executors.base import Executor, Stage
from crucible.data_pipeline.progress import Progress
from crucible.data_pipeline.readers.files import expand_inputs
from crucible.data_pipeline.run_dir import check_run_dir, read_marker, work_paths
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages.decontaminate import decontaminate_stages
from crucible.data_pipeline.stages.dedup import dedup_stages
from crucible.data_pipeline.stages.filter import filter_stage
from crucible.data_pipeline.stages.finalize import FinalizeStage, finalize_stage
from crucible.data_pipeline.stages.parts import PartStage
from crucible.errors import CrucibleError

STEP_ORDER = (
    "read",
    "normalize",
    "language",
    "gopher_repetition",
    "gopher_quality",
    "c4",
    "fineweb",
    "pii",
    "exact_dedup",
    "minhash_dedup",
    "decontaminate",
)


def make_executor(name: str, spec: DataSpec, verbose: bool = False) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``), configured from ``spec``; Ray
    Data's logging and progress bars are quiet unless ``verbose``."""
    if name == "local":
        from crucible.data_pipeline.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from crucible.data_pipeline.executors.ray import RayExecutor, quiet_third_party

        quiet_third_party(verbose)
        return RayExecutor(num_workers=spec.num_workers, partition_bytes=spec.partition_bytes)
    raise CrucibleError(f"unknown executor {name!r}; use 'ray' or 'local'")


def run_pipeline(
    spec: DataSpec,
    run_dir: Location | str,
    executor: Literal["ray", "local"] = "ray",
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run raw inputs -> ``run_dir/documents`` (+ exclusions, stats.json), then shards if set.

    Args:
        spec: the ``data:`` section.
        run_dir: where everything is written; rerunning into it resumes or does nothing.
        executor: ``"ray"`` (Ray Data) or ``"local"`` (in-process).
        progress: show each stage's progress (documents/s, MB/s, per-step counts) on
            standard error: a bar on a terminal, one-line updates in a log.
        verbose: keep third-party logging (Ray Data's INFO logs and progress bars), which is
            quiet by default.

    Returns:
        The stats (as written to ``stats.json``).

    Raises:
        CrucibleError: an input or eval-set path matches no file, or ``run_dir`` cannot be
            written.
    """
    run_dir = check_storage(run_dir)
    inputs = expand_inputs(spec.inputs)
    p = work_paths(run_dir)
    digest = spec_hash(spec)
    stats_path = run_dir / "stats.json"
    done = read_marker(stats_path) if (p["documents"] / "_SUCCESS").is_file() else None
    if done is not None and done.get("spec_hash") == digest:
        shards = _shard_stages(spec, run_dir, digest)
        if shards:
            _run_stages(make_executor(executor, spec, verbose), shards, progress, (0, 0))
        return done
    n = len(inputs)
    decontaminate = decontaminate_stages(spec, run_dir, n)  # eval files checked before any write
    for d in ("filtered", "excluded", "filter_done", "dedup", "final_done", "documents"):
        p[d].mkdirs()
    p["exclusions"].mkdirs()
    if spec.decontaminate.enabled:
        (run_dir / "decontamination").mkdirs()
    check_run_dir(run_dir, digest, inputs)
    ex = make_executor(executor, spec, verbose)
    t0 = time.time()
    metrics = _DataMonitor(run_dir.name, on_cluster=executor == "ray")
    filtered = _run_stages(
        ex,
        [filter_stage(spec, run_dir, inputs, progress=progress, on_part=metrics.update)],
        progress,
        (0, 0),
    )
    steps = list(filtered["filter"].values())
    survivors = (steps[-1]["docs_out"], steps[-1]["bytes_out"]) if steps else (0, 0)
    stages: list[Stage] = [
        *dedup_stages(spec, run_dir, n),
        *decontaminate,
        finalize_stage(spec, run_dir, n, progress=progress),
    ]
    out = {**filtered, **_run_stages(ex, stages, progress, survivors)}
    if "minhash" in out:
        metrics.on_dedup(out["minhash"])
    dedup: dict[str, Any] = {k: out[k] for k in ("exact", "minhash") if k in out}
    stats = _assemble(merge_stats(out["filter"], out["finalize"]), dedup, digest, n)
    if "decontaminate" in out:
        stats["decontamination"] = out["decontaminate"]
    stats["seconds"] = round(time.time() - t0, 3)
    stats["executor"] = executor
    stats_path.write_json(stats)
    (p["documents"] / "_SUCCESS").write_json({"spec_hash": digest, **stats["totals"]})
    metrics.update(stats["steps"])
    _run_stages(ex, _shard_stages(spec, run_dir, digest), progress, survivors)
    metrics.close()
    return stats


def _run_stages(
    ex: Executor, stages: list[Stage], progress: bool, docs: tuple[int, int]
) -> dict[str, Any]:
    """Run ``stages`` in order, each with its progress display; ``{stage: statistics}``.

    Per-part stages (filter, finalize) show their own, part by part; the others (the
    shuffles, the shard build) a line when they start and one when they end, with their
    rates over ``docs`` (documents, bytes: the filter's survivors, their input).
    """
    out: dict[str, Any] = {}
    for stage in stages:
        if isinstance(stage, (PartStage, FinalizeStage)):
            out[stage.name] = stage.run(ex)
            continue
        bar = Progress(stage.name, enabled=progress)
        out[stage.name] = s = stage.run(ex)
        if stage.name == "shards":
            bar.update(0, s.get("documents", 0))
        else:
            bar.update(0, *docs)
        bar.close(_summary(stage, s, time.monotonic() - bar.t0))
    return out


def _summary(stage: Stage, s: dict[str, Any], seconds: float) -> str:
    """One line on what a stage found or made."""
    if stage.name == "exact":
        return f"{s.get('duplicates', 0):,} exact duplicates"
    if stage.name == "minhash":
        return (
            f"{s.get('duplicates', 0):,} documents in near-duplicate clusters besides their "
            f"roots, exact copies included ({s.get('edges', 0):,} edges, "
            f"{s.get('rounds', 0)} rounds)"
        )
    if stage.name == "decontaminate":
        return f"{s.get('matches', 0):,} eval-set n-gram matches"
    if stage.name == "shards":
        out = getattr(stage, "out_dir", None)
        tokens = s.get("document_tokens", 0)
        return (
            f"{s.get('rows', 0):,} rows, {tokens:,} tokens "
            f"({tokens / max(seconds, 1e-9):,.0f} tokens/s) in {out.uri if out else '?'}"
        )
    return ""


class _DataMonitor:
    """Prometheus metrics of a data run, served while it runs on a Ray cluster.

    With the Ray executor the driver serves its metrics and registers them with the cluster's
    target registry (:mod:`crucible.monitoring.discovery`); at the end it waits for a scrape
    that begins after the final update (at most :attr:`FINAL_SCRAPE_S`), so the final totals
    reach Prometheus. In-process runs export nothing. Metrics never stop the pipeline.
    """

    FINAL_SCRAPE_S = 30.0  # two of the 15 s scrape intervals generated cluster configs use

    def __init__(self, run: str, on_cluster: bool) -> None:
        self.port: int | None = None
        self.dm: Any = None
        if not on_cluster:
            return
        try:
            from crucible.monitoring.exporter import start_exporter
            from crucible.monitoring.metrics import DataMetrics

            self.dm = DataMetrics()
            self.port = start_exporter(run, "data", 0, self.dm.registry)
        except Exception as e:  # metrics must never stop the pipeline
            print(f"warning: data metrics disabled ({type(e).__name__}: {e})", flush=True)

    def update(self, step_stats: dict[str, Any]) -> None:
        if self.dm is not None:
            self.dm.update(step_stats)

    def on_dedup(self, minhash: dict[str, Any]) -> None:
        if self.dm is not None:
            sizes = minhash.get("cluster_sizes", {})
            members = sum(int(k) * int(v) for k, v in sizes.items())
            self.dm.on_dedup(members, sizes)

    def close(self) -> None:
        if self.port is None:
            return
        from crucible.monitoring.exporter import stop_exporter

        # a data job's counts are its whole run: wait for Prometheus to hold two samples of
        # them (a rate), even when the job was shorter than its discovery
        stop_exporter(self.port, final_scrape_s=self.FINAL_SCRAPE_S, until_samples=2)


def _assemble(steps: dict[str, Any], dedup: dict[str, Any], digest: str, n: int) -> dict:
    ordered = {k: steps[k] for k in STEP_ORDER if k in steps}
    drops = {
        f"{name}/{rule}": count
        for name, s in ordered.items()
        for rule, count in s.get("dropped", {}).items()
    }
    langs = {
        k.removeprefix("lang_"): v
        for k, v in ordered.get("language", {}).get("counters", {}).items()
        if k.startswith("lang_")
    }
    last = ordered[list(ordered)[-1]] if ordered else {}
    first = ordered.get("read", {})
    return {
        "spec_hash": digest,
        "inputs": n,
        "steps": ordered,
        "drops": dict(sorted(drops.items())),
        "languages": dict(sorted(langs.items(), key=lambda kv: (-kv[1], kv[0]))),
        "duplicate_clusters": dedup.get("minhash", {}).get("cluster_sizes", {}),
        "dedup": dedup,
        "totals": {
            "docs_in": first.get("docs_in", 0),
            "bytes_in": first.get("bytes_in", 0),
            "docs_out": last.get("docs_out", 0),
            "bytes_out": last.get("bytes_out", 0),
        },
    }


def _shard_stages(spec: DataSpec, run_dir: Location, digest: str) -> list[Stage]:
    if spec.shards is None:
        return []
    from crucible.data_pipeline.shards.build import ShardStage

    chat = spec.reader.chat
    return [
        ShardStage(
            run_dir / "documents",
            spec.shards,
            run_dir / "shards",
            digest,
            chat.template if chat is not None else None,
            chat is not None and chat.comparisons,
        )
    ]
