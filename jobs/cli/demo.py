"""``crucible demo``: the main job on the local embedded cluster, from nothing.

Local cluster up → a generated sample corpus (JSONL + WARC, with duplicates, junk and several
languages) → the data job submitted through the Ray Jobs API (filters, dedup, tokenizer,
packed Arrow shards) → a summary of what was produced and where to look.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
import yaml
from rich.console import Console

from crucible.cluster import local

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


def demo(
    workdir: Path = typer.Option(Path("demo"), help="Where the corpus, spec and runs go."),
    docs: int = typer.Option(2000, help="Documents in the generated corpus."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Cluster state directory."),
) -> None:
    """Run the main job end to end on the local embedded cluster and summarise it."""
    from crucible.data_pipeline.sample import generate_corpus
    from crucible.jobs.runs import absolutize
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.submit import follow, submit_run

    t0 = time.monotonic()
    workdir = workdir.resolve()
    console.rule("1/3 local cluster")
    with console.status("starting Ray head and Prometheus ..."):
        state, started = local.up(state_dir)
    console.print(f"{'started' if started else 'reusing'} cluster: {state.dashboard_url}")

    console.rule("2/3 sample corpus")
    corpus = workdir / "corpus"
    if not (corpus / "truth.json").exists():
        truth = generate_corpus(corpus, n_docs=docs, seed=0)
        (corpus / "truth.json").write_text(
            json.dumps({k: v for k, v in truth.items() if k != "texts"}, default=str)
        )
    files = sorted(p for p in corpus.iterdir() if p.name != "truth.json")
    size = sum(p.stat().st_size for p in files)
    console.print(f"{len(files)} files, {size / 1e6:.1f} MB in {corpus}")

    console.rule("3/3 data job on the cluster (Ray Jobs API)")
    name = "demo-data"
    raw = demo_spec(workdir, name)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "demo-data.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = absolutize(parse_spec(raw, source=str(workdir / "demo-data.yaml")))
    if state_dir is not None:
        spec.cluster.state_dir = state_dir
    client, job_id, run_dir = submit_run(spec, resume=True)
    console.print(f"job {job_id}")
    rc = follow(client, job_id)
    if rc:
        raise typer.Exit(rc)

    console.rule("summary")
    stats = json.loads((run_dir / "stats.json").read_text())
    console.print(
        f"documents: {stats['totals']['docs_in']:,} read -> {stats['totals']['docs_out']:,} kept "
        f"(drops by rule and duplicate clusters above; `crucible data stats {run_dir}`)"
    )
    manifest = run_dir / "shards" / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        totals = m.get("totals", {})
        console.print(
            f"training shards: {manifest.parent}  "
            f"({', '.join(f'{k} {v}' for k, v in totals.items())})"
        )
    console.print(f"run directory:   {run_dir}")
    console.print(f"Ray dashboard:   {state.dashboard_url}  (token: {state.token_path})")
    console.print(f"Prometheus:      {state.prometheus_url}")
    console.print(
        f"demo took {time.monotonic() - t0:.0f}s; stop the cluster: crucible cluster down"
    )
