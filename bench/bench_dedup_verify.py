"""How MinHash candidates are checked, on template web pages: cost and quality side by side.

Pages of a site share a header and a footer and differ in their body; bodies range from a
line to several paragraphs, so pages of the same site span every Jaccard from about 0.3 to
1 and many same-site pairs land near the 0.8 threshold, with thousands of LSH candidates.
Some pages are also near copies of another page. Every filter is off, so all pages reach
the dedup.

Each check runs the pipeline in a fresh process; the figures are that process's CPU seconds
in the MinHash stage (LSH buckets, checks, components) and in the whole run, the pairs
checked exactly, and document-level precision/recall/F1 against the exact ground truth
(:mod:`dedup_quality`):

- ``signature``: the MinHash estimate against the threshold (``verify: signature``);
- ``margin``: the default ``verify: exact``, the exact Jaccard only of pairs whose estimate
  is within 3 standard errors of the threshold;
- ``all-exact``: the exact Jaccard of every candidate (the margin widened to 1).

    python bench/bench_dedup_verify.py                     # 1,400 pages
    python bench/bench_dedup_verify.py --sites 20 --pages 140 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from dedup_quality import dedup_scores, similar_pairs, true_clusters  # beside this script

from crucible.data_pipeline.sample import WORDS, make_text, near_duplicate

MODES = ("signature", "margin", "all-exact")


def site_chrome(rng: random.Random, site: int) -> tuple[str, str]:
    """``(header, footer)`` of one site: navigation, a tagline, a long legal footer."""
    words = WORDS["en"]
    nav = " ".join(rng.choice(words).capitalize() for _ in range(rng.randint(12, 25)))
    header = f"Site {site} Home. {nav}\n{make_text(rng, 'en', rng.randint(15, 40))}"
    footer = make_text(rng, "en", rng.randint(60, 120))
    return header, footer


def template_pages(
    sites: int = 10, pages: int = 140, near_frac: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """``{id: text}`` of ``sites * pages`` template pages (header + body + footer).

    Args:
        sites: number of sites (templates).
        pages: pages per site.
        near_frac: share of pages that are near copies (Jaccard 0.6-0.98) of an earlier page
            of their site.
        seed: random seed.
    """
    rng = random.Random(seed)
    texts: dict[str, str] = {}
    for s in range(sites):
        header, footer = site_chrome(rng, s)
        mine: list[str] = []
        for p in range(pages):
            pid = f"s{s:03d}-p{p:04d}"
            if mine and rng.random() < near_frac:
                texts[pid] = near_duplicate(rng, texts[rng.choice(mine)], rng.uniform(0.6, 0.98))
            else:
                # body length: many short pages (listings, stubs) and a tail of articles
                n = int(rng.choice([rng.randint(3, 20), rng.randint(10, 60), rng.randint(40, 400)]))
                texts[pid] = f"{header}\n{make_text(rng, 'en', n)}\n{footer}"
            mine.append(pid)
    return texts


def write_jsonl(texts: dict[str, str], folder: Path, files: int = 4) -> None:
    """``texts`` as ``files`` JSONL files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = list(texts)
    for k in range(files):
        lines = [json.dumps({"id": i, "text": texts[i]}) for i in ids[k::files]]
        (folder / f"part-{k}.jsonl").write_text("\n".join(lines) + "\n")


def spec_json(inp: Path, mode: str) -> str:
    """The spec of ``mode``: every filter off, MinHash at its defaults."""
    from crucible.data_pipeline.spec import DataSpec

    off = {"enabled": False}
    mh = {"verify": "signature"} if mode == "signature" else {}
    return DataSpec(
        inputs=[str(inp)],
        language=off,
        gopher_repetition=off,
        gopher_quality=off,
        c4=off,
        fineweb=off,
        pii=off,
        dedup={"minhash": mh},
    ).model_dump_json()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(spec: str, mode: str, run: str, q: Any) -> None:
    import crucible.data_pipeline.stages.dedup as stages
    from crucible.data_pipeline.pipeline import run_pipeline
    from crucible.data_pipeline.spec import DataSpec, MinHashSpec

    if mode == "all-exact":
        MinHashSpec.margin = property(lambda self: 1.0)  # type: ignore[assignment,method-assign]
    spent: dict[str, float] = {}
    inner = stages.fuzzy_dedup

    def timed(*args: Any, **kwargs: Any) -> dict[str, Any]:
        c0, t0 = _cpu(), time.perf_counter()
        out = inner(*args, **kwargs)
        spent.update(minhash_cpu=_cpu() - c0, minhash_wall=time.perf_counter() - t0)
        return out

    stages.fuzzy_dedup = timed  # type: ignore[assignment]
    c0, t0 = _cpu(), time.perf_counter()
    stats = run_pipeline(DataSpec.model_validate_json(spec), Path(run), "local", False)
    spent.update(run_cpu=_cpu() - c0, run_wall=time.perf_counter() - t0)
    q.put((spent, stats["dedup"]["minhash"]))


def run_mode(inp: Path, run: Path, mode: str) -> tuple[dict[str, float], dict[str, Any]]:
    """``(seconds, minhash stats)`` of one pipeline run in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec_json(inp, mode), mode, str(run), q))
    proc.start()
    out = q.get()
    proc.join()
    return out


def scores(texts: dict[str, str], run: Path) -> dict[str, float]:
    """Precision/recall/F1 of the run's dedup drops (exact + MinHash) at Jaccard 0.8."""
    exc = pq.read_table(sorted((run / "exclusions").glob("*.parquet")), columns=["id", "rule"])
    rules = zip(exc["id"].to_pylist(), exc["rule"].to_pylist(), strict=True)
    removed = [i for i, r in rules if "dedup" in r]
    ids = sorted(texts)
    i, j, _ = similar_pairs([texts[k] for k in ids], 5, 0.8)
    clusters = [[ids[k] for k in c] for c in true_clusters(len(ids), i, j)]
    return dedup_scores(clusters, removed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--pages", type=int, default=140, help="pages per site")
    ap.add_argument("--rounds", type=int, default=2, help="runs per mode (alternating); best")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    texts = template_pages(args.sites, args.pages)
    write_jsonl(texts, work / "in")
    mb = sum(len(t.encode()) for t in texts.values()) / 1e6
    near, _, _ = similar_pairs(list(texts.values()), 5, 0.5)
    print(
        f"corpus: {len(texts)} template pages ({args.sites} sites), {mb:.2f} MB of text, "
        f"{near.size} pairs at Jaccard >= 0.5",
        flush=True,
    )
    modes = args.modes.split(",")
    best: dict[str, dict[str, float]] = {}
    last: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            run = work / f"run-{mode}-{r}"
            spent, mh = run_mode(work / "in", run, mode)
            if mode not in last:
                last[mode] = (mh, scores(texts, run))
            old = best.setdefault(mode, spent)
            for k, v in spent.items():
                old[k] = min(old[k], v)
            shutil.rmtree(run, ignore_errors=True)
    print(
        f"{'check':<10} {'minhash CPU s':>13} {'run CPU s':>9} {'edges':>6} {'exact-checked':>13} "
        f"{'exact kept':>10} {'precision':>9} {'recall':>7} {'F1':>6}"
    )
    for mode in modes:
        s, (mh, q) = best[mode], last[mode]
        print(
            f"{mode:<10} {s['minhash_cpu']:>13.2f} {s['run_cpu']:>9.2f} {mh['edges']:>6} "
            f"{mh['exact_checked']:>13} {mh['exact_kept']:>10} {q['precision']:>9.4f} "
            f"{q['recall']:>7.4f} {q['f1']:>6.4f}"
        )
    if "signature" in best:
        base = best["signature"]["minhash_cpu"]
        for mode in modes:
            n = last[mode][0]["exact_checked"]
            if n:
                extra = best[mode]["minhash_cpu"] - base
                print(f"{mode}: {1e6 * extra / n:.0f} CPU us per exactly checked pair")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
