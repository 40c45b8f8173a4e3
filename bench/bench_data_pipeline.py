"""Benchmark data pipeline I against datatrove, on a generated corpus with planted duplicates
and on real text (:mod:`real_corpus`: Debian changelogs and copyright files, Python package
descriptions and licences found on this machine).

Both systems run each round in a fresh child process started the same way; the figure is the
CPU seconds (user + system, the child and anything it starts) of the work alone, measured
inside the child after its imports, so neither side pays for interpreter start-up. Rounds
alternate the order of the systems; the best round is reported. datatrove runs Gopher
repetition + quality, C4 and FineWeb filters once (stage 1 writes the survivors and their
MinHash signatures; stage 4 filters those survivors), MinHash 14x8 on 5-grams with its
default xxhash shingle hash. crucible's "datatrove-equivalent" is the full chain without
language id and PII. Dedup precision/recall/F1 at Jaccard 0.8 are scored for both against
the exact ground truth (every pair of documents that reached dedup and shares a 5-gram).

    python bench/bench_data_pipeline.py --quick              # ~5 MB of each corpus
    python bench/bench_data_pipeline.py --mb 50 --real-mb 50 --rounds 2
    python bench/bench_data_pipeline.py --quick --variants   # with/without the check
    python bench/bench_data_pipeline.py --ray-vs-local 5,200 # full chain, local vs Ray
    python bench/bench_data_pipeline.py --ray-memory 50,100  # peak worker memory on Ray
    python bench/bench_data_pipeline.py --ray-memory 10,20 --part-mb 5  # the same, quicker
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
from dedup_quality import dedup_scores, similar_pairs, true_clusters  # beside this script
from real_corpus import write_real_corpus

DOC_BYTES = 1160  # mean UTF-8 text bytes of a generated document: --mb is MB of text


def cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def datatrove_work(inp: str, out: str) -> Callable[[], dict]:
    """datatrove's four filters and MinHash dedup, each filter run once (built, not run)."""
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)
    steps = [
        # survivors of the filters written in read order: stage 4 reads them back, and the
        # signature stage numbered them in that same order
        [
            JsonlReader(inp, glob_pattern="*.jsonl*"),
            GopherRepetitionFilter(),
            GopherQualityFilter(),
            C4QualityFilter(),
            FineWebQualityFilter(),
            JsonlWriter(f"{out}/filtered"),
            MinhashDedupSignature(output_folder=f"{out}/sigs", config=cfg),
        ],
        [MinhashDedupBuckets(f"{out}/sigs", f"{out}/buckets", config=cfg)],
        [MinhashDedupCluster(f"{out}/buckets", f"{out}/ids", config=cfg)],
        [
            JsonlReader(f"{out}/filtered"),
            MinhashDedupFilter(f"{out}/ids", exclusion_writer=JsonlWriter(f"{out}/removed")),
            JsonlWriter(f"{out}/docs"),
        ],
    ]
    executors = [
        LocalPipelineExecutor(
            pipeline=p, tasks=14 if k == 1 else 1, workers=1, logging_dir=f"{out}/log{k}"
        )
        for k, p in enumerate(steps)
    ]

    def work() -> dict:
        for ex in executors:
            ex.run()
        return {}

    return work


def crucible_work(spec_json: str, run: str, executor: str) -> Callable[[], dict]:
    """crucible's pipeline (built, not run; its statistics when run)."""
    from crucible.data_pipeline.pipeline import run_pipeline
    from crucible.data_pipeline.spec import DataSpec

    spec = DataSpec.model_validate_json(spec_json)
    return lambda: run_pipeline(spec, Path(run), executor, False)


def child_main(argv: list[str]) -> None:
    """``--child SYSTEM ...``: import and build, then time the work alone; one JSON line on
    stdout. ``SYSTEM`` is ``datatrove`` or crucible's executor (``local`` or ``ray``)."""
    system = argv[0]
    if system == "datatrove":
        work = datatrove_work(argv[1], argv[2])
    else:
        work = crucible_work(Path(argv[1]).read_text(), argv[2], system)
    init_s = 0.0
    if system == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
    c0, t0 = cpu_s(), time.perf_counter()
    stats = work()
    out = {
        "cpu_s": cpu_s() - c0,
        "wall_s": time.perf_counter() - t0,
        "init_s": init_s,
        "rss_mb": peak_rss_mb(),
        "stats": stats,
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args: list[str]) -> dict:
    """One ``--child`` run in a fresh interpreter; its RESULT line."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-3000:]}")


def truth_clusters(texts: dict[str, str], threshold: float = 0.8) -> list[list[str]]:
    """Exact clusters among the documents that reached dedup, as they reached it (filters such
    as C4's drop lines): components of every pair whose exact 5-gram Jaccard (the shingling
    MinHash uses) is >= ``threshold``, over all pairs."""
    ids = sorted(texts)
    i, j, _ = similar_pairs([texts[k] for k in ids], 5, threshold)
    return [[ids[k] for k in c] for c in true_clusters(len(ids), i, j)]


def crucible_prf(run_dir: Path) -> dict[str, float]:
    """Document-level precision/recall/F1 of crucible's dedup drops at Jaccard 0.8."""
    exc = pq.read_table(sorted((run_dir / "exclusions").glob("*.parquet")))
    docs = pq.read_table(sorted((run_dir / "documents").glob("*.parquet")), columns=["id", "text"])
    texts = dict(zip(docs["id"].to_pylist(), docs["text"].to_pylist(), strict=True))
    removed = []
    for i, rule, text in zip(*(exc[c].to_pylist() for c in ("id", "rule", "text")), strict=True):
        if "dedup" in rule:
            texts[i] = text
            removed.append(i)
    return dedup_scores(truth_clusters(texts), removed)


def datatrove_prf(out: Path) -> dict[str, float]:
    """The same scores for datatrove: its MinHash filter's kept and removed documents."""

    def read(folder: Path) -> dict[str, str]:
        got = {}
        for f in sorted(folder.glob("*.jsonl*")):
            with gzip.open(f, "rt") if f.suffix == ".gz" else open(f) as fh:
                for line in fh:
                    if line.strip():
                        rec = json.loads(line)
                        got[rec["id"]] = rec["text"]
        return got

    removed = read(out / "removed")
    return dedup_scores(truth_clusters({**read(out / "docs"), **removed}), list(removed))


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

    from crucible.data_pipeline.pipeline import run_pipeline
    from crucible.data_pipeline.sample import generate_corpus
    from crucible.data_pipeline.spec import DataSpec

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
        for task, (rss, priv) in sorted(sampler.by_task.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"  {task}: heap {priv / 2**20:.0f} MB, RSS {rss / 2**20:.0f} MB")
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(work / f"mem-run-{mb:g}", ignore_errors=True)


def crucible_specs(inp: Path, variants: bool) -> dict[str, Any]:
    """The crucible specs compared: the full chain and datatrove's steps (+ check variants)."""
    from crucible.data_pipeline.spec import DataSpec

    # whole texts of dropped documents: the dedup is scored on the texts that reached it
    out = {"output": {"max_exclusion_text_chars": 10**9}}
    equivalent = {"language": {"enabled": False}, "pii": {"enabled": False}, **out}
    specs = {
        "crucible full chain": DataSpec(inputs=[str(inp)], **out),
        "crucible datatrove-equivalent": DataSpec(inputs=[str(inp)], **equivalent),
    }
    if variants:
        for name, mh in (
            ("signature-only check", {"verify": "signature"}),
            ("no check", {"threshold": 0.0}),
        ):
            specs[f"crucible datatrove-equivalent, {name}"] = DataSpec(
                inputs=[str(inp)], dedup={"minhash": mh}, **equivalent
            )
    return specs


def compare(
    work: Path, corpus: str, truth: dict, inp: Path, rounds: int, variants: bool, datatrove: bool
) -> None:
    """crucible's specs and datatrove on one corpus, ``rounds`` alternating rounds; the best
    round (least CPU) of each, and dedup scores from each one's first round.

    Args:
        work: scratch folder.
        corpus: the corpus's name (printed).
        truth: ``{"texts": {id: text}}`` of every input document.
        inp: the folder of the JSONL inputs.
        rounds: runs per system.
        variants: also the check variants of crucible's dedup.
        datatrove: include datatrove.
    """
    texts = truth["texts"]
    raw = sum(len(t.encode()) for t in texts.values()) / 1e6
    specs = crucible_specs(inp, variants)
    systems = [*specs, *(["datatrove"] if datatrove else [])]
    best: dict[str, dict] = {}
    scores: dict[str, dict] = {}
    for r in range(rounds):
        for label in systems if r % 2 == 0 else systems[::-1]:
            out = work / f"{inp.name}-{r}-{label.replace(' ', '_').replace(',', '')}"
            if label == "datatrove":
                res = run_child(["datatrove", str(inp), str(out)])
                if label not in scores:
                    scores[label] = datatrove_prf(out)
            else:
                spec_path = out.with_suffix(".json")
                spec_path.write_text(specs[label].model_dump_json())
                res = run_child(["local", str(spec_path), str(out)])
                if label not in scores:
                    scores[label] = crucible_prf(out)
            if label not in best or res["cpu_s"] < best[label]["cpu_s"]:
                best[label] = res
            shutil.rmtree(out, ignore_errors=True)
    print(f"\n{corpus}: {len(texts)} docs, {raw:.1f} MB of text; best of {rounds} round(s)")
    for label in systems:
        res, q = best[label], scores[label]
        mh = res["stats"].get("dedup", {}).get("minhash", {})
        extra = f", exact-checked pairs {mh['exact_checked']}" if mh else ""
        print(
            f"  {label}: {res['cpu_s']:.1f} CPU s ({raw / res['cpu_s']:.2f} MB per CPU s, "
            f"{len(texts) / res['cpu_s']:,.0f} docs per CPU s), wall {res['wall_s']:.1f} s, "
            f"peak RSS {res['rss_mb']:.0f} MB{extra}, dedup at J 0.8 {json.dumps(q)}",
            flush=True,
        )
    if datatrove:
        ratio = best["datatrove"]["cpu_s"] / best["crucible datatrove-equivalent"]["cpu_s"]
        print(f"  datatrove CPU s / crucible datatrove-equivalent CPU s: {ratio:.2f}x")


def ray_vs_local(work: Path, sizes_mb: list[float], rounds: int) -> None:
    """Full chain on the same generated corpus, in-process and on a private 2-CPU Ray cluster
    (each in a fresh process, the cluster started before the clock); wall time and ratios."""
    from crucible.data_pipeline.sample import generate_corpus
    from crucible.data_pipeline.spec import DataSpec

    for mb in sizes_mb:
        inp = work / f"rvl-{mb:g}"
        n_docs = int(mb * 1e6 / DOC_BYTES)
        truth = generate_corpus(inp, n_docs=n_docs, seed=0, files=max(4, round(mb / 12.5)))
        raw = sum(len(t.encode()) for t in truth["texts"].values()) / 1e6
        spec_path = work / f"rvl-{mb:g}.json"
        spec_path.write_text(DataSpec(inputs=[str(inp)]).model_dump_json())
        best: dict[str, dict] = {}
        for r in range(rounds):
            for executor in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                run = work / f"rvl-run-{executor}"
                res = run_child([executor, str(spec_path), str(run)])
                if executor not in best or res["wall_s"] < best[executor]["wall_s"]:
                    best[executor] = res
                shutil.rmtree(run, ignore_errors=True)
        loc, ray_ = best["local"], best["ray"]
        print(
            f"{raw:.1f} MB of text ({n_docs} docs), full chain, best of {rounds}: "
            f"local {loc['wall_s']:.1f} s wall ({raw / loc['wall_s']:.2f} MB/s, "
            f"{loc['cpu_s']:.1f} CPU s); ray (num_cpus=2) {ray_['wall_s']:.1f} s wall "
            f"({raw / ray_['wall_s']:.2f} MB/s; cluster start {ray_['init_s']:.1f} s not "
            f"counted); ray/local wall {ray_['wall_s'] / loc['wall_s']:.2f}x, "
            f"throughput ray/local {loc['wall_s'] / ray_['wall_s']:.2f}x",
            flush=True,
        )
        shutil.rmtree(inp, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200.0, help="MB of generated text")
    ap.add_argument("--real-mb", type=float, default=50.0, help="MB of real text (0: none)")
    ap.add_argument("--quick", action="store_true", help="5 MB of each corpus")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; best is shown")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also score the dedup with signature-only checking and with no check",
    )
    ap.add_argument(
        "--ray-vs-local",
        type=str,
        default=None,
        help="comma-separated corpus sizes in MB (e.g. 5,200): full chain with the local and "
        "the Ray executor, wall time and ratios; skips the datatrove comparison",
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
    if args.ray_vs_local:
        ray_vs_local(work, [float(x) for x in args.ray_vs_local.split(",")], args.rounds)
        shutil.rmtree(work, ignore_errors=True)
        return
    from crucible.data_pipeline.sample import generate_corpus

    mb = 5.0 if args.quick else args.mb
    real_mb = 5.0 if args.quick else args.real_mb
    if mb > 0:
        # inputs of ~12.5 MB each: a part (one task's share) stays the same size as it grows
        n_docs = int(mb * 1e6 / DOC_BYTES)
        inp = work / "generated"
        files = max(4, round(mb / 12.5))
        # JSONL only (datatrove reads no WARC here)
        truth = generate_corpus(inp, n_docs=n_docs, seed=0, files=files, warc=False)
        name = "generated corpus (planted near/exact duplicates, junk, other languages)"
        compare(work, name, truth, inp, args.rounds, args.variants, not args.no_datatrove)
    if real_mb > 0:
        inp = work / "real"
        real = write_real_corpus(inp, real_mb)
        what = ", ".join(f"{k} {d} docs {b / 1e6:.1f} MB" for k, (d, b) in real["sources"].items())
        name = f"real text ({what})"
        compare(work, name, real, inp, args.rounds, args.variants, not args.no_datatrove)
    shutil.rmtree(work, ignore_errors=True)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: a process started by fork + exec
    (multiprocessing's spawn, subprocess) inherits its parent's RSS at the fork in that."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


if __name__ == "__main__":
    main()
