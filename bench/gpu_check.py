"""The GPU check: one command that proves the GPU path on this machine's GPU and measures it.

    make gpu-check                      # = python3 bench/gpu_check.py --out gpu-check
    python3 bench/gpu_check.py --out DIR [--budget-s 480] [--wheels DIR] [--items ...]

1. **Set-up.** The Python that runs it must have CUDA torch (pyproject's range). What else
   crucible's GPU path needs (DeepSpeed and its few dependencies) is installed into
   ``DIR/site`` when missing: from ``--wheels DIR`` offline, else from the package index.
   DeepSpeed's ops are not prebuilt (``DS_BUILD_OPS=0``): FusedAdam is JIT-built with the
   machine's nvcc and ninja, in the background while the shards are made.
2. **Benchmarks** (``bench/bench_gpu.py``, one process each): tokens/s, MFU and peak memory
   of crucible's train job, a bare DeepSpeed loop and ``transformers`` + DeepSpeed, with
   the planner's predicted memory and step time beside them.
3. **GPU tests** (``pytest -m gpu tests/gpu``).
4. ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``, rewritten after every item, so a
   check cut short still leaves what it measured. Items that would not finish within
   ``--budget-s`` are skipped and listed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["deepspeed", "hjson", "pydantic", "datasets"]  # beyond what a CUDA torch image holds
# (stack, preset, micro-batch, activation checkpointing, compile): each stack's 1.3B and
# 2.7B at the same shape, then what each speed-up gives, then 7B with checkpointing.
GRID = [
    ("crucible", "gpt3-1.3b", 8, False, False),
    ("bare", "gpt3-1.3b", 8, False, False),
    ("hf", "gpt3-1.3b", 8, False, False),
    ("crucible", "gpt3-2.7b", 8, False, False),
    ("bare", "gpt3-2.7b", 8, False, False),
    ("hf", "gpt3-2.7b", 8, False, False),
    ("bare-det", "gpt3-1.3b", 8, False, False),
    ("crucible", "gpt3-1.3b", 8, False, True),
    ("crucible", "llama2-7b", 3, True, False),
]
ITEM_CAP_S = 240
TESTS_S = 180  # what the GPU tests take on an H100/H200, kept for them when they come last


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_packages(site: Path, wheels: Path | None) -> dict[str, str]:
    """Install what is missing into ``site`` and put it on the path of this process and its
    children; make ``crucible`` importable from this checkout."""
    env_path = [str(site)]
    if importlib.util.find_spec("crucible") is None:
        pkg = site.parent / "pkg"
        pkg.mkdir(parents=True, exist_ok=True)
        link = pkg / "crucible"
        if not link.exists():
            link.symlink_to(ROOT)
        env_path.append(str(pkg))
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        site.mkdir(parents=True, exist_ok=True)
        if wheels is not None:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                   "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site),
                   "deepspeed", "hjson", "pydantic", "datasets"]  # fmt: skip
        log(f"installing {', '.join(missing)} into {site}")
        subprocess.run(cmd, check=True, env=os.environ | {"DS_BUILD_OPS": "0"})
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [*env_path, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path[:0] = env_path
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "gpus": str(torch.cuda.device_count()),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
    }


def _version(name: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__version__)"],
                         capture_output=True, text=True)  # fmt: skip
    return (out.stdout.strip().splitlines() or ["missing"])[-1]


def build_fused_adam() -> subprocess.Popen:
    """JIT-build DeepSpeed's FusedAdam in the background (cached for the benchmarks)."""
    code = ("from crucible.jobs.train.environment import prepare_process; prepare_process(True); "
            "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def make_shards(root: Path, seq_len: int) -> Path:
    """Shards of ``seq_len``-token rows from generated text (a 320-id tokenizer; the models
    keep their own vocabulary, so the logits cost what they cost)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from crucible.data_pipeline.executors.local import LocalExecutor
    from crucible.data_pipeline.shards.build import build_shards
    from crucible.data_pipeline.shards.spec import ShardSpec

    out = root / f"shards-{seq_len}"
    if (out / "manifest.json").is_file():
        return out
    docs = root / f"documents-{seq_len}"
    docs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    ids = [f"doc{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([200, 900, 3000]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate(
        {"seq_len": seq_len, "heldout_fraction": 0.02, "tokenizer": {"train": {"vocab_size": 320}}}
    )
    build_shards(docs, spec, out, LocalExecutor(), "gpu-check")
    return out


def run_item(item: tuple, shards: Path, work: Path, timeout: float, steps: int) -> dict[str, Any]:
    stack, preset, mbs, ckpt, comp = item
    name = f"{stack}-{preset}-mbs{mbs}{'-ckpt' if ckpt else ''}{'-compile' if comp else ''}"
    out = work / f"{name}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), stack, "--preset", preset,
           "--mbs", str(mbs), "--shards", str(shards), "--workdir", str(work / "runs"),
           "--out", str(out), "--steps", str(steps)]  # fmt: skip
    cmd += ["--checkpointing"] * ckpt + ["--compile"] * comp
    log(f"benchmark {name} (up to {timeout:.0f} s)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        oom = "OutOfMemoryError" in tail or "CUDA out of memory" in tail
        return {"name": name, "error": "out of memory" if oom else "failed", "log": tail}
    result = json.loads(out.read_text()) | {"name": name}
    log(f"  {name}: {result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
        f"peak {result['peak_memory_bytes'] / 2**30:.1f} GiB ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return result


def run_tests(out_dir: Path, timeout: float) -> dict[str, Any]:
    xml = out_dir / "gpu_tests.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        str(ROOT / "tests" / "gpu"),
        f"--junitxml={xml}",
    ]
    log("GPU tests")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    tests: dict[str, str] = {}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    status = f"{tag}: {(el.get('message') or '')[:300]}"
            tests[case.get("name", "?")] = status
    (out_dir / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    log(f"  {sum(s == 'passed' for s in tests.values())}/{len(tests)} passed")
    return {"returncode": proc.returncode, "tests": tests}


def pair_rows(results: list[dict[str, Any]]) -> list[str]:
    """Markdown tables: each measurement, the ratios between stacks, the planner's error."""
    ok = [r for r in results if "error" not in r]
    rows = ["| run | step s | tokens/s | MFU | peak GiB | predicted GiB | mem err | "
            "predicted step s | step err |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in ok:
        p = r["predicted"]
        mem_err = p["memory_bytes"] / max(r["peak_memory_bytes"], 1) - 1
        step_err = p["step_seconds"] / r["step_seconds"] - 1
        rows.append(
            f"| {r['name']} | {r['step_seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.1%} | {r['peak_memory_bytes'] / 2**30:.1f} | "
            f"{p['memory_bytes'] / 2**30:.1f} | {mem_err:+.0%} | {p['step_seconds']:.3f} | "
            f"{step_err:+.0%} |"
        )
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | {r['error']} | | | | | | | |")
    rows += ["", "| model | crucible / bare DeepSpeed | crucible / bare, deterministic | "
             "crucible / transformers |", "|---|---|---|---|"]  # fmt: skip
    by = {r["name"]: r for r in ok}
    for r in ok:
        if r["stack"] != "crucible":
            continue
        key = r["name"].removeprefix("crucible-")
        others = [by.get(f"{stack}-{key}") for stack in ("bare", "bare-det", "hf")]
        ratio = [f"{r['tokens_per_s'] / o['tokens_per_s']:.3f}" if o else "not run"
                 for o in others]  # fmt: skip
        rows.append(f"| {key} | {' | '.join(ratio)} |")
    return rows


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    env = summary["environment"]
    md = ["# GPU check", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if "fused_adam_build_seconds" in summary:
        md.append(f"FusedAdam JIT build: {summary['fused_adam_build_seconds']:.0f} s")
    md += ["", "## Throughput, MFU (6N + attention over the dense bf16 peak) and the planner",
           "", *pair_rows(summary["benchmarks"])]  # fmt: skip
    tests = summary.get("tests", {}).get("tests", {})
    md += ["", "## GPU tests", ""] + [f"- {k}: {v}" for k, v in tests.items()]
    if summary.get("skipped"):
        md += ["", "Not run (budget): " + ", ".join(summary["skipped"])]
    (out_dir / "gpu_check.md").write_text("\n".join(md) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="the summary's folder")
    ap.add_argument("--work", type=Path, help="installs, shards and runs (default: OUT/work)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per benchmark")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting items after this")
    ap.add_argument("--wheels", type=Path, help="install missing packages from these wheels")
    ap.add_argument("--items", type=int, nargs="*", help="indexes into the grid (default all)")
    ap.add_argument(
        "--tests-after",
        type=int,
        default=-1,
        help="run the GPU tests after this many benchmarks (-1: last)",
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    out_dir = args.out.resolve()
    work = (args.work or args.out / "work").resolve()
    for d in (out_dir, work):
        d.mkdir(parents=True, exist_ok=True)
    env = ensure_packages(work / "site", args.wheels)
    log(f"environment: {env}")
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu-check: torch sees no CUDA GPU; run it with a CUDA build of torch")
    summary: dict[str, Any] = {"environment": env, "benchmarks": [], "skipped": []}
    t0 = time.perf_counter()
    adam = build_fused_adam()
    shards = make_shards(work, 2048)
    log(f"shards ready in {time.perf_counter() - t0:.0f} s")
    adam_out, _ = adam.communicate()
    summary["fused_adam_build_seconds"] = time.perf_counter() - t0
    if adam.returncode != 0:
        log(f"FusedAdam build failed:\n{adam_out[-3000:]}")
        summary["fused_adam_error"] = adam_out[-3000:]

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    items = [GRID[i] for i in args.items] if args.items else GRID
    tests_at = len(items) if args.tests_after < 0 else args.tests_after
    for i, item in enumerate([*items, None]):
        if i == tests_at:
            reserve = 0 if i == len(items) else 60  # keep a benchmark's time for after them
            summary["tests"] = run_tests(out_dir, max(left() - reserve, 60))
            write_summary(out_dir, summary)
        if item is None:
            break
        reserve = TESTS_S if i < tests_at else 0
        if left() - reserve < 45:
            summary["skipped"].append("-".join(map(str, item[:3])))
            continue
        summary["benchmarks"].append(
            run_item(item, shards, work, min(ITEM_CAP_S, left() - reserve), args.steps)
        )
        write_summary(out_dir, summary)
    summary["wall_seconds"] = time.perf_counter() - t_start
    write_summary(out_dir, summary)
    log(f"done in {summary['wall_seconds']:.0f} s: {out_dir / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
