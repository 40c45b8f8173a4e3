"""``crucible demo``: the main job on the local embedded cluster, from nothing.

Local cluster up → a generated sample corpus (JSONL + WARC, with duplicates, junk and several
languages) → the data job through the Ray Jobs API (filters, dedup, tokenizer, packed Arrow
shards) → a tiny GPT trained with DeepSpeed ZeRO-3 on 2 Ray Train workers, one of which is
killed (SIGKILL) after a checkpoint and resumed automatically → a summary with the loss
curve, tokens/s, worker-hours and where the checkpoints and metrics are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import typer
import yaml
from rich.console import Console

from crucible.cluster import local
from crucible.cluster.storage import Location, read_jsonl
from crucible.monitoring.prometheus import rule_files

console = Console()


def demo_spec(workdir: Path, name: str) -> dict:
    """The demo's data spec: the sample corpus to training shards for the tiny model."""
    return {
        "kind": "data",
        "name": name,
        "cluster": {"storage": str(workdir / "runs")},
        "data": {
            "inputs": [str(workdir / "corpus")],
            "shards": {
                "tokenizer": {"train": {"vocab_size": 512}},
                "seq_len": 128,
                "heldout_fraction": 0.05,
            },
        },
    }


def train_spec(workdir: Path, shards: Path, name: str, steps: int) -> dict:
    """The demo's train spec: the tiny GPT, ZeRO-3 on 2 workers, checkpoints every 50 steps."""
    return {
        "kind": "train",
        "name": name,
        "cluster": {"storage": str(workdir / "runs")},
        "model": {"preset": "tiny", "parallel": {"zero_stage": 3, "precision": "bf16"}},
        "data": {"shards": str(shards), "seed": 0},
        "optim": {
            "lr": 1e-3,
            "warmup_steps": 20,
            "global_batch_size": 16,
            "micro_batch_size": 4,
        },
        "checkpoint": {"every_steps": 50, "keep_last": 2, "keep_every": 100},
        "train": {
            "num_workers": 2,
            "max_steps": steps,
            "eval_every": 50,
            "max_failures": 3,
            "log_every": 10,
        },
    }


def kill_worker_after(run_dir: Location, step: int, stop: threading.Event) -> threading.Thread:
    """SIGKILL training worker rank 1 once checkpoint ``step`` is committed (a crash drill)."""

    def watch() -> None:
        latest = run_dir / "checkpoints" / "latest"
        while not stop.is_set():
            if latest.is_file() and latest.read_text().strip() == f"step-{step}":
                pid = int((run_dir / "workers" / "rank-1.pid").read_text())
                console.print(
                    f"[bold red]crash drill:[/] SIGKILL worker rank 1 (pid {pid}) after "
                    f"checkpoint step-{step}; Ray Train restarts the workers from it"
                )
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def demo(
    workdir: Path = typer.Option(Path("demo"), help="Where the corpus, spec and runs go."),
    docs: int = typer.Option(2000, help="Documents in the generated corpus."),
    steps: int = typer.Option(300, help="Training steps of the tiny GPT."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Cluster state directory."),
) -> None:
    """Run the main job end to end on the local embedded cluster and summarise it."""
    from crucible.config import spec_hash
    from crucible.data_pipeline.sample import generate_corpus
    from crucible.jobs.runs import absolutize
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.submit import follow, submit_run

    t0 = time.monotonic()
    workdir = workdir.resolve()
    console.rule("1/4 local cluster")
    with console.status("starting Ray head and Prometheus ..."):
        state, started = local.up(state_dir, rule_files=rule_files())
    console.print(f"{'started' if started else 'reusing'} cluster: {state.dashboard_url}")

    console.rule("2/4 sample corpus")
    corpus = workdir / "corpus"
    truth_path = workdir / "corpus-truth.json"  # ground truth of the planted duplicates
    if not truth_path.exists():
        shutil.rmtree(corpus, ignore_errors=True)
        truth = generate_corpus(corpus, n_docs=docs, seed=0)
        truth_path.write_text(
            json.dumps({k: v for k, v in truth.items() if k != "texts"}, default=str)
        )
    files = sorted(corpus.iterdir())
    size = sum(p.stat().st_size for p in files)
    console.print(f"{len(files)} files, {size / 1e6:.1f} MB in {corpus}")

    console.rule("3/4 data job on the cluster (Ray Jobs API)")
    name = "demo-data"
    raw = demo_spec(workdir, name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "demo-data.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = absolutize(parse_spec(raw, source=str(workdir / "demo-data.yaml")))
    if state_dir is not None:
        spec.cluster.state_dir = state_dir
    old = workdir / "runs" / name
    saved = old / "spec.resolved.yaml"
    # the hash written with the spec (not one recomputed now): a run made by an older
    # crucible, whose spec lacked fields added since, is replaced too
    if saved.exists() and saved.read_text().splitlines()[0] != f"# spec sha256: {spec_hash(spec)}":
        console.print(f"replacing {old}: it was made by another version of the demo spec")
        shutil.rmtree(old)
    client, job_id, run_dir = submit_run(spec, resume=True)
    console.print(f"job {job_id}")
    rc = follow(client, job_id)
    if rc:
        raise typer.Exit(rc)

    shards = run_dir / "shards"

    console.rule("4/4 train: tiny GPT, DeepSpeed ZeRO-3 on 2 Ray Train workers")
    tname = "demo-train"
    old_train = workdir / "runs" / tname
    if old_train.exists():
        console.print(f"replacing the previous demo training run in {old_train}")
        shutil.rmtree(old_train)
    traw = train_spec(workdir, shards.local_path, tname, steps)
    (workdir / "demo-train.yaml").write_text(yaml.safe_dump(traw, sort_keys=False))
    tspec = parse_spec(traw, source=str(workdir / "demo-train.yaml"))
    if state_dir is not None:
        tspec.cluster.state_dir = state_dir
    client, tjob, train_dir = submit_run(tspec)
    console.print(f"job {tjob}")
    stop = threading.Event()
    kill_worker_after(train_dir, min(100, steps // 2 // 50 * 50 or 50), stop)
    try:
        rc = follow(client, tjob)
    finally:
        stop.set()
    if rc:
        raise typer.Exit(rc)

    console.rule("summary")
    _summary(workdir, run_dir, train_dir, state, state_dir, time.monotonic() - t0)


def _summary(
    workdir: Path,
    data_dir: Location,
    train_dir: Location,
    state: local.ClusterState,
    state_dir: Path | None,
    seconds: float,
) -> None:
    from crucible.monitoring.ledger import account
    from crucible.monitoring.report import write_report

    stats = (data_dir / "stats.json").read_json()
    t = stats["totals"]
    console.print(f"documents:        {t['docs_in']:,} read -> {t['docs_out']:,} kept ({data_dir})")
    manifest = (data_dir / "shards" / "manifest.json").read_json()
    totals = manifest.get("totals", {})
    console.print(
        f"training shards:  {totals.get('rows', '?'):,} rows of {manifest['seq_len'] + 1} tokens "
        f"({data_dir / 'shards'})"
    )
    records = read_jsonl(train_dir / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "step"]
    if steps:
        tps = sum(r["tokens"] for r in steps) / sum(r["step_seconds"] for r in steps)
        console.print(
            f"training:         {len(steps)} step records, loss {steps[0]['loss']:.3f} -> "
            f"{steps[-1]['loss']:.3f}, {tps:,.0f} tokens/s"
        )
    ledger = account(train_dir)
    by_phase = ", ".join(f"{k} {v / 3600:.4f}" for k, v in ledger.seconds.items() if v > 0)
    console.print(
        f"worker-hours:     {ledger.total_seconds / 3600:.4f} over {ledger.attempts} attempts "
        f"({by_phase})"
    )
    latest = (train_dir / "checkpoints" / "latest").read_text().strip()
    console.print(f"checkpoint:       {train_dir / 'checkpoints' / latest}")
    images = write_report(train_dir)
    console.print(f"report:           {train_dir / 'report' / 'report.md'}")
    for img in images:
        if img.name.endswith(".png"):
            console.print(f"                  {img}")
    console.print(
        f"Prometheus:       {state.prometheus_url}  (dashboards: crucible/monitoring/dashboards/)"
    )
    console.print(f"Ray dashboard:    {state.dashboard_url}  (token file: {state.token_path})")
    console.print(f"live view:        crucible monitor {train_dir}")
    stop = "crucible cluster down" + (f" --state-dir {state_dir}" if state_dir else "")
    console.print(f"demo took {seconds:.0f}s; stop the cluster: {stop}")
