"""Entry point of data pipeline I: raw inputs to clean documents, exclusions and stats.

Stages, each resumable (each output file published whole, a marker written last; nothing
relies on renaming a directory, so the same steps run on object stores):
1. filter   one task per input part: read -> normalise -> language -> quality -> PII,
            plus each survivor's exact-text hash and MinHash band keys;
2. exact    global exact dedup (hash-partitioned groupby on Ray);
3. minhash  LSH buckets -> edges -> distributed connected components;
4. final    per part: drop duplicates, write documents/ and exclusions/;
then stats.json and documents/_SUCCESS, last. A finished run started again does nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from crucible.cluster.storage import Location, check_storage
from crucible.config import spec_hash
from crucible.data_pipeline.progress import Progress
from crucible.data_pipeline.readers.files import expand_inputs
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages import read_marker, work_paths
from crucible.data_pipeline.step import merge_stats
from crucible.data_pipeline.writers.parquet import write_json_atomic
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
)


def _executor(name: str, spec: DataSpec) -> Any:
    if name == "local":
        from crucible.data_pipeline.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from crucible.data_pipeline.executors.ray import RayExecutor

        return RayExecutor(num_workers=spec.num_workers, partition_bytes=spec.partition_bytes)
    raise CrucibleError(f"unknown executor {name!r}; use 'ray' or 'local'")


def _check_run_dir(run_dir: Location, digest: str, inputs: list[str]) -> None:
    meta_path = work_paths(run_dir)["work"] / "run.json"
    meta = read_marker(meta_path)
    if meta is None:
        write_json_atomic(meta_path, {"spec_hash": digest, "inputs": inputs})
    elif meta.get("spec_hash") != digest or meta.get("inputs") != inputs:
        raise CrucibleError(
            f"{run_dir} holds a data run of a different spec or input list; "
            "use a new run directory (or delete this one) to run this spec"
        )


def run_pipeline(
    spec: DataSpec,
    run_dir: Location | str,
    executor: Literal["ray", "local"] = "ray",
    progress: bool = True,
) -> dict[str, Any]:
    """Run raw inputs -> ``run_dir/documents`` (+ exclusions, stats.json), then shards if set.

    Args:
        spec: the ``data:`` section.
        run_dir: where everything is written; rerunning into it resumes or does nothing.
        executor: ``"ray"`` (Ray Data) or ``"local"`` (in-process).
        progress: show a progress display (documents/s, bytes/s, per-step counts).

    Returns:
        The stats (as written to ``stats.json``).

    Raises:
        CrucibleError: an input matches no file, or ``run_dir`` cannot be written.
    """
    run_dir = check_storage(run_dir)
    inputs = expand_inputs(spec.inputs)
    p = work_paths(run_dir)
    digest = spec_hash(spec)
    stats_path = run_dir / "stats.json"
    done = read_marker(stats_path) if (p["documents"] / "_SUCCESS").is_file() else None
    if done is not None and done.get("spec_hash") == digest:
        _build_shards(spec, run_dir, _executor(executor, spec), digest)
        return done
    for d in ("filtered", "excluded", "filter_done", "dedup", "final_done", "documents"):
        p[d].mkdirs()
    p["exclusions"].mkdirs()
    _check_run_dir(run_dir, digest, inputs)
    ex = _executor(executor, spec)
    t0 = time.time()
    parts = list(range(len(inputs)))
    metrics = _DataMonitor(run_dir.name, on_cluster=executor == "ray")

    # 1. filter
    step_stats: dict[str, Any] = {}
    todo = []
    for part in parts:
        if (s := read_marker(p["filter_done"] / f"part-{part:05d}.json")) is not None:
            step_stats = merge_stats(step_stats, s)
        else:
            todo.append((part, inputs[part]))
    with Progress(len(parts), enabled=progress) as bar:
        bar.update(len(parts) - len(todo), step_stats)

        def filtered(part: int, s: dict[str, Any]) -> None:
            nonlocal step_stats
            step_stats = merge_stats(step_stats, s)
            bar.update(1, step_stats)
            metrics.update(step_stats)

        ex.filter_parts(todo, spec, run_dir, filtered)

    # 2-3. dedup over every part's survivors; each attempt writes a fresh result directory
    # that the stage's marker (written last) names, and unnamed ones are an interrupted
    # attempt's leftovers
    files = [p["filtered"] / f"part-{i:05d}.parquet" for i in parts]
    dedup: dict[str, Any] = {}
    for kind, enabled in (
        ("exact", spec.dedup.exact.enabled),
        ("minhash", spec.dedup.minhash.enabled),
    ):
        marker = p["dedup"] / f"{kind}.json"
        if not enabled:
            continue
        s = read_marker(marker)
        if s is not None and "result" not in s:
            s = None  # not written by this protocol: redo
        for old in p["dedup"].glob(f"{kind}-*"):
            if s is None or old.name != s.get("result"):
                old.rmtree()
        if s is None:
            out_dir = p["dedup"] / f"{kind}-{uuid.uuid4().hex[:12]}"
            s = (
                ex.exact_dedup(files, out_dir)
                if kind == "exact"
                else ex.fuzzy_dedup(files, out_dir, spec)
            )
            s["result"] = out_dir.name
            write_json_atomic(marker, s)
        dedup[kind] = {k: v for k, v in s.items() if k != "result"}
        if kind == "minhash":
            metrics.on_dedup(s)

    # 4. final documents and exclusions per part
    final_stats: dict[str, Any] = {}
    todo_parts = []
    for part in parts:
        if (s := read_marker(p["final_done"] / f"part-{part:05d}.json")) is not None:
            final_stats = merge_stats(final_stats, s)
        else:
            todo_parts.append(part)

    def finalized(part: int, s: dict[str, Any]) -> None:
        nonlocal final_stats
        final_stats = merge_stats(final_stats, s)

    ex.finalize_parts(todo_parts, spec, run_dir, finalized)

    stats = _assemble(merge_stats(step_stats, final_stats), dedup, digest, len(inputs))
    stats["seconds"] = round(time.time() - t0, 3)
    stats["executor"] = executor
    write_json_atomic(stats_path, stats)
    write_json_atomic(p["documents"] / "_SUCCESS", {"spec_hash": digest, **stats["totals"]})
    metrics.update(stats["steps"])
    _build_shards(spec, run_dir, ex, digest)
    metrics.close()
    return stats


class _DataMonitor:
    """Prometheus metrics of a data run, served while it runs on a Ray cluster.

    With the Ray executor the driver serves its metrics and registers them with the cluster's
    target registry (:mod:`crucible.monitoring.discovery`); at the end it stays up one scrape
    interval so the final totals are scraped. In-process runs export nothing. Metrics never
    stop the pipeline.
    """

    LINGER_S = 6.0  # the local cluster's scrape interval is 5 s

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

        time.sleep(self.LINGER_S)
        stop_exporter(self.port)


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


def _build_shards(spec: DataSpec, run_dir: Location, executor: Any, digest: str) -> None:
    if spec.shards is None:
        return
    from crucible.data_pipeline.shards.build import build_shards

    build_shards(run_dir / "documents", spec.shards, run_dir / "shards", executor, digest)
