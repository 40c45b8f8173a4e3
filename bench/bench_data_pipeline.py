"""Benchmark data pipeline I against datatrove on a generated corpus with planted duplicates.

Reports documents/s and MB/s per core for the full chain (in-process executor, one core, each
run in a fresh process for its peak RSS), dedup precision/recall/F1 at Jaccard 0.8 against the
exact ground truth (every pair of documents that reached dedup and shares a 5-gram), and the
same corpus through datatrove (Gopher repetition + quality, C4, FineWeb filters, MinHash 14x8
on 5-grams) as a ratio, scored the same way.

    python bench/bench_data_pipeline.py --quick --variants   # ~5 MB, with/without the check
    python bench/bench_data_pipeline.py --mb 200             # the real figure
    python bench/bench_data_pipeline.py --mb 200 --datatrove-mb 50   # datatrove on a subset
    python bench/bench_data_pipeline.py --ray-memory 50,100  # peak worker memory on Ray
    python bench/bench_data_pipeline.py --ray-memory 10,20 --part-mb 5  # the same, quicker
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import zstandard
from dedup_quality import dedup_scores, similar_pairs, true_clusters  # beside this script

from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.sample import generate_corpus
from crucible.data_pipeline.spec import DataSpec

DOC_BYTES = 1160  # mean UTF-8 text bytes of a generated document: --mb is MB of text
DATATROVE = r"""
import sys, time
from datatrove.executor.local import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.filters import (GopherRepetitionFilter, GopherQualityFilter,
    C4QualityFilter, FineWebQualityFilter)
from datatrove.pipeline.dedup import (MinhashDedupSignature, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":
    inp, out = sys.argv[1], sys.argv[2]
    # sha1 shingle hashes: datatrove 0.10.1's xxhash path passes str, which xxhash 3.6 rejects
    cfg = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5,
                        hash_config=HashConfig(precision=64, hash_fc="sha1"))
    t0 = time.time()
    LocalPipelineExecutor(pipeline=[JsonlReader(inp, glob_pattern="*.jsonl*"),
        GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
        MinhashDedupSignature(output_folder=f"{out}/sigs", config=cfg)],
        tasks=1, workers=1, logging_dir=f"{out}/l1").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=f"{out}/sigs",
        output_folder=f"{out}/buckets", config=cfg)], tasks=14, workers=1,
        logging_dir=f"{out}/l2").run()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=f"{out}/buckets",
        output_folder=f"{out}/ids", config=cfg)], tasks=1, logging_dir=f"{out}/l3").run()
    LocalPipelineExecutor(pipeline=[JsonlReader(inp, glob_pattern="*.jsonl*"),
        GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter(),
        MinhashDedupFilter(input_folder=f"{out}/ids",
                           exclusion_writer=JsonlWriter(f"{out}/removed")),
        JsonlWriter(f"{out}/docs")],
        tasks=1, workers=1, logging_dir=f"{out}/l4").run()
    import re, resource
    # VmHWM, not ru_maxrss: a process started by fork + exec inherits its parent's RSS in it
    hwm = int(re.search(r"VmHWM:\s*(\d+)", open("/proc/self/status").read()).group(1))
    rss = max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print("SECONDS", time.time() - t0, "RSS_MB", rss / 1024)
"""


def truth_clusters(truth: dict, reached: list[str], threshold: float = 0.8) -> list[list[str]]:
    """Exact clusters among the ``reached`` documents: components of every pair whose exact
    5-gram Jaccard (the shingling MinHash uses) is >= ``threshold``, over all pairs."""
    texts = [truth["texts"][i] for i in reached]
    i, j, _ = similar_pairs(texts, 5, threshold)
    return [[reached[k] for k in c] for c in true_clusters(len(reached), i, j)]


def crucible_prf(truth: dict, run_dir: Path) -> dict[str, float]:
    """Document-level precision/recall/F1 of crucible's dedup drops at Jaccard 0.8."""
    exc = pq.read_table(sorted((run_dir / "exclusions").glob("*.parquet")), columns=["id", "rule"])
    rules = dict(zip(exc.column("id").to_pylist(), exc.column("rule").to_pylist(), strict=True))
    reached = sorted(i for i in truth["texts"] if i not in rules or "dedup" in rules[i])
    removed = [i for i, r in rules.items() if "dedup" in r]
    return dedup_scores(truth_clusters(truth, reached), removed)


def datatrove_prf(truth: dict, out: Path) -> dict[str, float]:
    """The same scores for datatrove: its MinHash filter's kept and removed documents."""

    def ids(folder: Path) -> list[str]:
        got = []
        for f in sorted(folder.glob("*.jsonl*")):
            with gzip.open(f, "rt") if f.suffix == ".gz" else open(f) as fh:
                got += [json.loads(line)["id"] for line in fh if line.strip()]
        return got

    removed = ids(out / "removed")
    reached = sorted(set(ids(out / "docs")) | set(removed))
    return dedup_scores(truth_clusters(truth, reached), removed)


class RssSampler:
    """Peak RSS of this process and of every Ray worker process it started, sampled."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak: dict[int, int] = {}
        self.private: dict[int, int] = {}  # RSS less shared pages (object store, libraries)
        self.names: dict[int, str] = {}
        self.tasks: dict[int, str] = {}
        # peak (RSS, private) per task name, sampled while the task runs
        self.by_task: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    name = " ".join(proc.cmdline())
                    if "default_worker" not in name and not name.startswith("ray::"):
                        continue
                    mem = proc.memory_info()
                except psutil.Error:
                    continue
                rss, heap = mem.rss, mem.rss - mem.shared
                if "IDLE" not in name:  # a busy worker's title names its task
                    self.tasks[proc.pid] = task = name[:80].strip()
                    old = self.by_task.get(task, (0, 0))
                    self.by_task[task] = (max(old[0], rss), max(old[1], heap))
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
                if heap > self.private.get(proc.pid, 0):
                    # the last task it ran (memory often peaks as a task ends)
                    self.private[proc.pid] = heap
                    self.names[proc.pid] = self.tasks.get(proc.pid, "?")
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_memory(
    work: Path, sizes_mb: list[float], part_mb: float = 25.0, partition_mb: float | None = None
) -> None:
    """Full chain on the Ray executor at each corpus size; peak memory per worker process.

    The headline is the worker heap as Ray defines it (RSS less shared pages: object-store
    pages a worker has mapped count in its RSS but belong to the store, whose size is set
    separately); peak RSS is printed beside it.

    Args:
        work: scratch folder.
        sizes_mb: corpus sizes (MB of text).
        part_mb: MB per input file: a part (one filter/finalise task's share) stays this size
            whatever the corpus size, so only stages that grow with the corpus show up.
        partition_mb: the spec's ``partition_bytes`` in MB (None: its default). A shuffle has
            at least one partition per CPU, so its partitions only reach this size, and
            memory stops growing, once its data is several times larger.
    """
    import ray

    for mb in sizes_mb:
        inp = work / f"mem-{mb:g}"
        files = max(round(mb / part_mb), 1)
        generate_corpus(inp, n_docs=int(mb * 1e6 / DOC_BYTES), seed=1, files=files, warc=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        with RssSampler() as sampler:
            t0 = time.time()
            extra = {"partition_bytes": int(partition_mb * 2**20)} if partition_mb else {}
            run_pipeline(
                DataSpec(inputs=[str(inp)], **extra),
                work / f"mem-run-{mb:g}",
                executor="ray",
                progress=False,
            )
            dt = time.time() - t0
        ray.shutdown()
        top = max(sampler.private, key=sampler.private.__getitem__)
        peaks = sorted(sampler.peak.values(), reverse=True)
        print(
            f"ray, {mb:g} MB corpus ({files} parts): {dt:.0f} s, {len(peaks)} worker processes, "
            f"peak worker heap (RSS - shared) {sampler.private[top] / 2**20:.0f} MB in "
            f"{sampler.names.get(top, '?')}; peak worker RSS {peaks[0] / 2**20:.0f} MB",
            flush=True,
        )
        for task, (rss, priv) in sorted(sampler.by_task.items(), key=lambda kv: -kv[1][1])[:5]:
            print(f"  {task}: heap {priv / 2**20:.0f} MB, RSS {rss / 2**20:.0f} MB")
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(work / f"mem-run-{mb:g}", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument(
        "--datatrove-mb",
        type=float,
        default=None,
        help="run datatrove on only the first files making up about this many MB (rates are "
        "per document and per MB, so the ratio stays per core)",
    )
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also score the dedup with signature-only checking and with no check",
    )
    ap.add_argument(
        "--ray-memory",
        type=str,
        default=None,
        help="comma-separated corpus sizes in MB (e.g. 50,100): full chain on Ray at each, "
        "peak RSS per worker; skips the throughput comparison",
    )
    ap.add_argument(
        "--part-mb",
        type=float,
        default=25.0,
        help="with --ray-memory: MB of text per input file (one part); use less for small sizes",
    )
    ap.add_argument(
        "--partition-mb",
        type=float,
        default=None,
        help="with --ray-memory: the spec's partition_bytes in MB (default: the spec's 64 MiB)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    if args.ray_memory:
        sizes = [float(x) for x in args.ray_memory.split(",")]
        ray_memory(work, sizes, args.part_mb, args.partition_mb)
        shutil.rmtree(work, ignore_errors=True)
        return
    mb = 5.0 if args.quick else args.mb
    n_docs = int(mb * 1e6 / DOC_BYTES)
    # inputs of ~12.5 MB each: a part (one task's share) stays the same size as the corpus grows
    files = max(4, round(mb / 12.5))
    truth = generate_corpus(work / "in", n_docs=n_docs, seed=0, files=files, warc=False)
    size = sum(Path(f).stat().st_size for f in truth["files"])
    raw = sum(len(t.encode()) for t in truth["texts"].values())
    print(f"corpus: {n_docs} docs, {raw / 1e6:.1f} MB of text, {size / 1e6:.1f} MB on disk")

    specs = {
        "crucible full chain": DataSpec(inputs=[str(work / "in")]),
        "crucible datatrove-equivalent": DataSpec(
            inputs=[str(work / "in")], language={"enabled": False}, pii={"enabled": False}
        ),
    }
    if args.variants:
        for name, mh in (
            ("signature-only check", {"verify": "signature"}),
            ("no check", {"threshold": 0.0}),
        ):
            specs[f"crucible datatrove-equivalent, {name}"] = DataSpec(
                inputs=[str(work / "in")],
                language={"enabled": False},
                pii={"enabled": False},
                dedup={"minhash": mh},
            )
    results = {}
    for label, spec in specs.items():
        run = work / label.replace(" ", "_").replace(",", "")
        dt, rss, stats = run_in_child(spec, run)
        results[label] = dt
        mh_stats = stats["dedup"].get("minhash", {})
        print(
            f"{label}: {dt:.1f} s, {n_docs / dt:,.0f} docs/s/core, {raw / 1e6 / dt:.2f} MB/s/core, "
            f"peak RSS {rss:.0f} MB, out {stats['totals']['docs_out']} docs, "
            f"exact-checked pairs {mh_stats.get('exact_checked')}, "
            f"dedup at J 0.8 {json.dumps(crucible_prf(truth, run))}",
            flush=True,
        )
        shutil.rmtree(run, ignore_errors=True)
    if not args.no_datatrove:
        inp, dt_docs, dt_raw = work / "in", n_docs, raw
        if args.datatrove_mb is not None and args.datatrove_mb < mb:
            # datatrove on the first files only; its rates are compared per document and per MB
            inp = work / "dt-in"
            inp.mkdir()
            dt_docs, dt_raw = 0, 0
            for f in sorted(Path(x) for x in truth["files"]):
                if dt_raw >= args.datatrove_mb * 1e6:
                    break
                (inp / f.name).symlink_to(f)
                d, b = file_text_stats(f)
                dt_docs, dt_raw = dt_docs + d, dt_raw + b
            print(f"datatrove input: {dt_docs} docs, {dt_raw / 1e6:.1f} MB of text (a subset)")
        out = work / "dt"
        script = work / "dt.py"
        script.write_text(DATATROVE)
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, str(script), str(inp), str(out)], capture_output=True, text=True
        )
        dt = time.time() - t0
        if proc.returncode:
            print("datatrove failed:", proc.stderr[-2000:])
        else:
            ours = results["crucible datatrove-equivalent"]
            print(
                f"datatrove: {dt:.1f} s, {dt_docs / dt:,.0f} docs/s/core, "
                f"{dt_raw / 1e6 / dt:.2f} MB/s/core, peak RSS "
                f"{float(proc.stdout.split('RSS_MB')[-1]):.0f} MB, "
                f"dedup at J 0.8 {json.dumps(datatrove_prf(truth, out))}\n"
                f"crucible/datatrove speed ratio per core (MB/s): "
                f"{(raw / ours) / (dt_raw / dt):.2f}x",
                flush=True,
            )
    shutil.rmtree(work, ignore_errors=True)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: a process started by fork + exec
    (multiprocessing's spawn, subprocess) inherits its parent's RSS at the fork in that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(spec_json: str, run: str, q: Any) -> None:
    t0 = time.time()
    stats = run_pipeline(DataSpec.model_validate_json(spec_json), Path(run), "local", False)
    q.put((time.time() - t0, peak_rss_mb(), stats))


def run_in_child(spec: DataSpec, run: Path) -> tuple[float, float, dict]:
    """``(seconds, peak RSS MB, stats)`` of the in-process executor in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec.model_dump_json(), str(run), q))
    proc.start()
    out = q.get()
    proc.join()
    return out


def file_text_stats(path: Path) -> tuple[int, int]:
    """Documents and UTF-8 text bytes of a JSONL input (plain, .gz or .zst)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    elif path.suffix == ".zst":
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    docs = nbytes = 0
    for line in raw.decode().splitlines():
        try:
            text = json.loads(line).get("text")
        except json.JSONDecodeError:
            continue
        if isinstance(text, str):
            docs, nbytes = docs + 1, nbytes + len(text.encode())
    return docs, nbytes


if __name__ == "__main__":
    main()
