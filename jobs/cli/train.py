"""``crucible train run``, ``crucible resume`` and ``crucible export``: the train job, restarting
a stopped run from its last valid checkpoint, and consolidated weights out of a checkpoint."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from crucible.errors import CrucibleError
from crucible.jobs.cli.options import (
    Address,
    StateDir,
    TokenPath,
    cluster_spec,
    follow_submitted,
)

app = typer.Typer(
    help="Train a GPT with DeepSpeed ZeRO-3 on Ray Train workers.", no_args_is_help=True
)


@app.callback()
def _group() -> None:
    """Train a GPT with DeepSpeed ZeRO-3 on Ray Train workers."""


SetOption = typer.Option([], "--set", help="Override a spec value: key.path=value (repeatable).")


def dry_run_text(spec: object) -> str:
    """The resolved DeepSpeed config and per-rank plan of a train spec; needs no cluster,
    no GPU and no shards (the sequence length comes from the shards' manifest when present,
    else from the model's context).

    Args:
        spec: a validated train spec.
    """
    from crucible.cluster.plan import plan_run
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.cli.plan import format_run_plan

    seq_len = None
    shards = spec.data.shards  # type: ignore[attr-defined]
    with contextlib.suppress(CrucibleError):
        seq_len = read_manifest(shards).seq_len
    use_gpu = bool(spec.train.use_gpu)  # type: ignore[attr-defined]
    plan = plan_run(spec, spec.train.num_workers, seq_len, use_gpu)  # type: ignore[arg-type, attr-defined]
    note = "" if seq_len else f"\n(shards {shards} not found: sequence length from the model)"
    return format_run_plan(spec, plan) + note  # type: ignore[arg-type]


def _submit(spec: object, resume: bool, detach: bool) -> None:
    from crucible.jobs.submit import submit_run

    client, job_id, d = submit_run(spec, resume=resume)  # type: ignore[arg-type]
    follow_submitted(client, job_id, spec.name, d, detach)  # type: ignore[attr-defined]


@app.command("run")
def run(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="A spec with kind: train."),
    set_: list[str] = SetOption,
    detach: bool = typer.Option(False, "--detach", help="Submit and return without following."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate; print the DeepSpeed config and per-rank plan."
    ),
) -> None:
    """Train SPEC on the cluster as a Ray job (Ray Train workers, DeepSpeed ZeRO-3)."""
    from crucible.jobs.runs import absolutize
    from crucible.jobs.spec import load_spec

    spec = absolutize(load_spec(spec_path, set_))
    if spec.kind != "train":
        raise CrucibleError(
            f"{spec_path} has kind: {spec.kind}; `crucible train run` needs kind: train"
        )
    if dry_run:
        typer.echo(dry_run_text(spec))
        return
    _submit(spec, resume=False, detach=detach)


def resume_cmd(
    run: str = typer.Argument(
        ..., help="A train run: its name (under --storage) or its directory (path or URI)."
    ),
    set_: list[str] = SetOption,
    storage: str | None = typer.Option(None, help="Storage root the run name is under."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return without following."),
    address: str | None = Address,
    state_dir: Path | None = StateDir,
    token_path: Path | None = TokenPath,
) -> None:
    """Start a stopped or failed run again from its newest valid checkpoint (on the cluster
    its spec names, or the one the options give).

    ``--set train.num_workers=M`` resumes on another world size (same global batch and data
    order; the checkpoint is converted to DeepSpeed's universal format). Only the keys in
    :data:`~crucible.jobs.resume_check.SAFE_ON_RESUME` may change; each accepted change is
    appended to ``<run>/spec_history.jsonl``. A run whose newest checkpoint is its last step
    is not submitted again (exit 0).
    """
    from crucible.config import apply_overrides
    from crucible.jobs.resume_check import check_resume_changes, finished_step, record_if_applied
    from crucible.jobs.runs import find_run, load_run_spec, run_location
    from crucible.jobs.spec import TrainRunSpec, parse_spec
    from crucible.jobs.submit import submit_run

    d = find_run(run, storage)
    old = spec = load_run_spec(d)
    if not isinstance(spec, TrainRunSpec):
        raise CrucibleError(f"run {d} is a {spec.kind} run; `crucible resume` resumes train runs")
    if set_:
        spec = parse_spec(apply_overrides(spec.model_dump(mode="json"), set_), source=str(d))
    if address or state_dir or token_path:
        where = cluster_spec(address, state_dir, token_path, base=spec.cluster)
        spec = spec.model_copy(update={"cluster": where})
    changes = check_resume_changes(old, spec)
    assert isinstance(spec, TrainRunSpec)  # its kind did not change
    done = finished_step(d, spec)
    if done is not None:
        typer.echo(
            f"run {spec.name} is finished (its newest checkpoint is its last step, {done}); "
            "nothing to resume (raise train.max_steps or train.max_tokens with --set to train on)"
        )
        return
    try:
        client, job_id, rd = submit_run(spec, resume=True)
    finally:
        record_if_applied(run_location(spec), spec, changes)
    follow_submitted(client, job_id, spec.name, rd, detach)


def export_cmd(
    checkpoint: str = typer.Argument(
        ...,
        help="A checkpoint (step-<N>), or a run directory (its newest valid checkpoint): a "
        "path or URI.",
    ),
    format: str = typer.Option("hf", "--format", help="hf (transformers directory) or torch."),
    out: Path = typer.Option(..., "--out", help="Output directory (hf) or file (torch)."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16 weights."),
) -> None:
    """Gather a ZeRO-3 checkpoint's shards into consolidated weights (torch or HF format)."""
    from crucible.jobs.train.export import export_checkpoint

    if format not in ("hf", "torch"):
        raise CrucibleError(f"--format {format!r} is not one of hf, torch")
    if dtype not in ("fp32", "bf16"):
        raise CrucibleError(f"--dtype {dtype!r} is not one of fp32, bf16")
    path = export_checkpoint(checkpoint, format, out, dtype)  # type: ignore[arg-type]
    typer.echo(f"wrote {format} weights ({dtype}) to {path}")
