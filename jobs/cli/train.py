"""``crucible train run``, ``crucible resume`` and ``crucible export``: the train job, restarting
a stopped run from its last valid checkpoint, and consolidated weights out of a checkpoint (as
Hugging Face, torch or GGUF files)."""

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
    spec_path: Path = typer.Argument(
        ...,
        metavar="SPEC",
        help="A spec of kind train, finetune, reward, rejection-sampling or ppo.",
    ),
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
    if spec.kind == "data":
        raise CrucibleError(
            f"{spec_path} has kind: data; `crucible train run` needs kind: train, finetune, "
            "reward, rejection-sampling or ppo (data specs run with `crucible data run`)"
        )
    if dry_run:
        if spec.kind in ("rejection-sampling", "ppo"):
            raise CrucibleError(f"--dry-run prints a training plan; kind: {spec.kind} has none")
        typer.echo(dry_run_text(spec))
        return
    _submit(spec, resume=False, detach=detach)


def resume_cmd(
    run: str = typer.Argument(
        ...,
        help="A train, finetune, reward or ppo run: its name (under --storage) or its "
        "directory (path or URI).",
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

    ``--set train.num_workers=M`` (a PPO run: ``workers.num_workers``) resumes on another
    world size (same global batch and data order; the checkpoint is converted to DeepSpeed's
    universal format). Only the keys in
    :data:`~crucible.jobs.resume_check.SAFE_ON_RESUME` may change; each accepted change is
    appended to ``<run>/spec_history.jsonl``. A run whose newest checkpoint is its last step
    is not submitted again (exit 0).
    """
    from crucible.config import apply_overrides
    from crucible.jobs.resume_check import check_resume_changes, finished_step, record_if_applied
    from crucible.jobs.runs import find_run, load_run_spec, run_location
    from crucible.jobs.spec import PPORunSpec, TrainRunSpec, parse_spec
    from crucible.jobs.submit import submit_run

    d = find_run(run, storage)
    old = spec = load_run_spec(d)
    if not isinstance(spec, TrainRunSpec | PPORunSpec):
        raise CrucibleError(
            f"run {d} is a {spec.kind} run; `crucible resume` resumes train, finetune, reward "
            "and ppo runs"
        )
    if set_:
        spec = parse_spec(apply_overrides(spec.model_dump(mode="json"), set_), source=str(d))
    if address or state_dir or token_path:
        where = cluster_spec(address, state_dir, token_path, base=spec.cluster)
        spec = spec.model_copy(update={"cluster": where})
    changes = check_resume_changes(old, spec)
    assert isinstance(spec, TrainRunSpec | PPORunSpec)  # its kind did not change
    done = finished_step(d, spec)
    if done is not None:
        budget = (
            "ppo.steps" if isinstance(spec, PPORunSpec) else "train.max_steps or train.max_tokens"
        )
        typer.echo(
            f"run {spec.name} is finished (its newest checkpoint is its last step, {done}); "
            f"nothing to resume (raise {budget} with --set to train on)"
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
    format: str = typer.Option(
        "hf",
        "--format",
        help="hf (transformers directory), torch, gguf (llama.cpp file) or torchao (int8 "
        "weights for PyTorch).",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Output directory (hf) or file (torch, gguf, torchao)."
    ),
    dtype: str = typer.Option("fp32", help="fp32 or bf16 weights (hf, torch)."),
    quant: str | None = typer.Option(
        None,
        "--quant",
        help="gguf: f32, f16 (default), q8_0, q5_0, q5_1, q4_0 or q4_1; k-quants (q4_k_m) come "
        "from llama.cpp's llama-quantize on an f16 file. torchao: int8 (weight-only).",
    ),
) -> None:
    """Gather a ZeRO-3 checkpoint's shards into consolidated weights (HF, torch or GGUF)."""
    from crucible.jobs.train.export import export_checkpoint

    if format == "gguf":
        _export_gguf(checkpoint, out, quant or "f16", dtype)
        return
    if dtype not in ("fp32", "bf16"):
        raise CrucibleError(f"--dtype {dtype!r} is not one of fp32, bf16")
    if format == "torchao":
        from crucible.jobs.train.export import load_model
        from crucible.model.torchao_export import quantize, save_quantized

        model = quantize(load_model(checkpoint, dtype), quant or "int8")
        save_quantized(model, out, quant or "int8")
        typer.echo(
            f"wrote torchao {quant or 'int8'} weights ({dtype} activations, "
            f"{out.stat().st_size:,} bytes) to {out}; load them with "
            "crucible.model.torchao_export.load_quantized"
        )
        return
    if format not in ("hf", "torch"):
        raise CrucibleError(f"--format {format!r} is not one of hf, torch, gguf, torchao")
    if quant is not None:
        raise CrucibleError("--quant is for --format gguf and torchao; hf and torch take --dtype")
    path = export_checkpoint(checkpoint, format, out, dtype)  # type: ignore[arg-type]
    typer.echo(f"wrote {format} weights ({dtype}) to {path}")


def _export_gguf(checkpoint: str, out: Path, quant: str, dtype: str) -> None:
    """``crucible export --format gguf``: the model, quantised, with the run's tokenizer."""
    from crucible.model.gguf import check_quant, gguf_arch, write_gguf

    if dtype != "fp32":
        raise CrucibleError("--dtype is for hf and torch; a GGUF file's types come from --quant")
    check_quant(quant)
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.spec import TrainRunSpec, parse_spec
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.export import load_model, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    spec = parse_spec(ckpt.read_state(path)["spec"], source=str(path / ckpt.STATE))
    if not isinstance(spec, TrainRunSpec):
        raise CrucibleError(f"{path} is a checkpoint of a {spec.kind} run, not of a train run")
    arch = gguf_arch(spec.model.resolve())  # before the weights load
    tok, eos = run_tokenizer(spec.data.shards)
    written = write_gguf(load_model(path), out, quant, tok, eos, name=spec.name)
    kept = [t.name for t in written if t.fallback]
    typer.echo(
        f"wrote {arch} GGUF ({quant}, {out.stat().st_size:,} bytes, {len(written)} tensors) "
        f"to {out}"
    )
    if kept:
        typer.echo(f"kept f16 (rows not whole {quant} blocks): {', '.join(kept)}")
