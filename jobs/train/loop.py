"""The per-worker train function that Ray Train's ``TorchTrainer`` runs on every rank.

Each worker: fixes its threads and kernels for determinism, builds the GPT sharded under
ZeRO-3 and wraps it with ``deepspeed.initialize`` (config from :mod:`.plan`), resumes from the
newest valid checkpoint if there is one, then for each optimizer step reads its slice of the
global batch from the :class:`TrainingReader`, runs ``grad_accum_steps`` micro-batches, sets
the LR from :func:`lr_at`, and reports loss, LR, grad norm, tokens and step time. The same
function runs after a worker-group restart, so recovery is just "start again".

Metrics, the GPU-hours ledger and the hang watchdog go through :class:`.Telemetry`, called
once per event (load, start, step, eval, checkpoint, end); it never touches the RNG streams
or the tensors, so a monitored run is bitwise the run it would have been.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crucible.cluster.storage import JsonlLog, Location, location
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.plan import TrainPlan, make_plan
from crucible.jobs.train.priority import yield_rank_helpers
from crucible.jobs.train.schedule import lr_at
from crucible.jobs.train.state import make_deterministic, rng_state, seed_everything, set_rng_state
from crucible.jobs.train.telemetry import Telemetry

METRICS = "metrics.jsonl"


def open_metrics(run_dir: Location) -> JsonlLog:
    """The run's ``metrics.jsonl`` log (rank 0 writes it; one JSON record per event).

    Args:
        run_dir: the run directory.
    """
    return JsonlLog(run_dir / METRICS, sync_every_s=1.0)


def say(message: str) -> None:
    """A line in the job log (bypasses Ray Train's print patch, which would log it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` without CUDA's architecture-variant suffixes (``9.0a`` → ``9.0``).

    DeepSpeed (0.19.8) parses each entry's minor version with ``int()`` when it JIT-builds an
    op such as FusedAdam, so a list PyTorch accepts (``9.0a``, set by Hopper images) fails
    with ``invalid literal for int() with base 10: '0a'`` (deepspeedai/DeepSpeed#7589). The
    ops it builds need no variant-specific instructions.

    Args:
        value: the variable's value; entries separated by spaces or semicolons.
    """
    return re.sub(r"(\d+\.\d+)[af](?=\+|;|\s|$)", r"\1", value)


def _quiet_third_party() -> None:
    # Ray Train logs every ray.train.report at INFO; the step line already says it all.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO-3 gathers call torch.distributed's *_tensor collectives, which torch
    # deprecates with a FutureWarning on every call: hundreds of job-log lines per run that
    # a user can do nothing about.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
        "deprecated",
        category=FutureWarning,
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases, norm scales or position tables (GPT-3)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        is_matrix = (getattr(p, "ds_shape", None) or p.shape).__len__() >= 2
        (decay if is_matrix and "pos_emb" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def choose_checkpoint(
    root: Location, mode: str, rank: int, world: int
) -> tuple[Location, Path, dict[str, Any]] | None:
    """The newest checkpoint that every rank agrees it can load: ``(checkpoint, local
    directory DeepSpeed loads from, manifest)``.

    Each rank checks the files it owns (all of the universal copy when the world size changed,
    since every rank reads every parameter's file); from an object store checking them is
    fetching them into node-local scratch. One rank's problem makes the whole group move on
    to the previous checkpoint: one collective decision.

    Args:
        root: the checkpoints directory.
        mode: ``sha256`` or ``size``.
        rank: this rank.
        world: number of ranks.
    """
    box: list[Any] = [ckpt.committed_steps(root) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one listing, the same for every rank
    for step in reversed(box[0]):
        path = ckpt.step_path(root, step)
        manifest, bad = ckpt.check_manifest(path)
        local = None
        if manifest is not None and int(manifest["world_size"]) != world:
            uni = root / ckpt.UNIVERSAL / path.name
            umanifest, ubad = ckpt.check_universal(uni)
            if umanifest is None:
                bad = ubad
            else:
                local, bad = ckpt.fetch(uni, sorted(umanifest["files"]), umanifest, mode)
        elif manifest is not None:
            mine = ckpt.owned_by(manifest["files"], rank, world)
            local, bad = ckpt.fetch(path, mine, manifest, mode)
        problems = [b for b in _all_gather(bad) if b]
        if not problems and manifest is not None and local is not None:
            return path, local, manifest
        if rank == 0:
            say(f"warning: skipping checkpoint {path.name}: {problems[0] if problems else bad}")
    return None


def build_engine(spec: Any, plan: TrainPlan, universal: bool = False) -> Any:
    """The model built sharded under ZeRO-3 (or plain below stage 3), wrapped by DeepSpeed.

    Args:
        spec: the train spec.
        plan: this world size's plan (holds the DeepSpeed config).
        universal: configure DeepSpeed to load a universal (world-size-free) checkpoint.
    """
    import deepspeed

    from crucible.jobs.train import hashing_engine
    from crucible.model.gpt import build_model, init_weights
    from crucible.model.parallelize import build_zero3_model, parallelize

    cfg = spec.model.resolve()
    config = dict(plan.ds_config)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    if spec.model.parallel.zero_stage == 3:
        model = build_zero3_model(cfg, config, seed=spec.train.seed)
    else:
        model = init_weights(build_model(cfg), seed=spec.train.seed)
    model = parallelize(model, spec.model.parallel)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, spec.optim.weight_decay),
        config=config,
    )
    hashing_engine.install(engine)
    return engine


def _micro_batches(batch: dict[str, Any], micro: int, device: torch.device) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + micro].to(device) for k, v in batch.items()} for i in range(0, n, micro)]


def evaluate(engine: Any, reader: Any, batches: int, plan: TrainPlan, doc_mask: bool) -> float:
    """Token-weighted held-out loss over the first ``batches`` global batches of the split.

    Args:
        engine: the DeepSpeed engine.
        reader: a held-out :class:`TrainingReader` of this rank.
        batches: global batches to evaluate.
        plan: the plan (micro-batch size).
        doc_mask: attend within documents only.
    """
    device = engine.device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL reduces device tensors
    engine.eval()
    with torch.no_grad():
        for batch in islice(reader.eval_batches(), batches):
            for mb in _micro_batches(batch, plan.micro_batch_size, device):
                logits, _ = engine(
                    mb["input_ids"], doc_ids=mb.get("doc_index") if doc_mask else None
                )
                labels = mb["labels"]
                loss = F.cross_entropy(
                    logits.float().view(-1, logits.size(-1)),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total += torch.stack([loss.double(), (labels != -100).sum().double()])
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def save(
    engine: Any,
    root: Location,
    step: int,
    state: dict[str, Any],
    rank: int,
    world: int,
) -> ckpt.SaveStats:
    """Save every rank's shards + RNG state and commit the checkpoint (see :mod:`.checkpoint`).

    Args:
        engine: the DeepSpeed engine.
        root: the checkpoints directory.
        step: optimizer steps taken.
        state: crucible's state (rank 0's is written).
        rank: this rank.
        world: number of ranks.
    """
    from crucible.jobs.train import hashing_engine  # imports DeepSpeed: after DS_ACCELERATOR

    t0 = time.perf_counter()
    box: list[Any] = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    stage = ckpt.stage_dir(root, step, box[0])
    if rank == 0:
        ckpt.clear_for_save(root, step)  # a crashed earlier attempt's partial save
        (stage / "crucible_state").mkdir(parents=True, exist_ok=True)
        write_json_local(stage / ckpt.STATE, state)
    dist.barrier()
    (stage / "crucible_state").mkdir(parents=True, exist_ok=True)  # another node's stage
    hashing = engine.checkpoint_engine
    is_hashing = isinstance(hashing, hashing_engine.HashingCheckpointEngine)
    written = hashing.written if is_hashing else {}
    written.clear()
    engine.save_checkpoint(str(stage), tag=ckpt.DS_TAG, save_latest=False)
    rng_file = stage / "crucible_state" / f"rank-{rank}.pt"
    written[os.path.abspath(rng_file)] = hashing_engine.save_hashed(rng_state(), rng_file)
    dist.barrier()  # every rank's files are written before anyone lists them
    files = ckpt.hash_own_files(stage, rank, world, known=written)
    ckpt.publish_own(root, step, stage, files)
    gathered = _all_gather(files)
    nbytes = sum(v["bytes"] for part in gathered for v in part.values())
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        ckpt.commit(root, step, merged, world)
    dist.barrier()
    if not (root.renames and root.is_local):
        shutil.rmtree(stage, ignore_errors=True)  # uploaded: the node-local copy goes
    return ckpt.SaveStats(step, ckpt.step_path(root, step), nbytes, time.perf_counter() - t0)


def write_json_local(path: Path, data: Any) -> None:
    """JSON to a local file, fsynced (part of a checkpoint's stage)."""
    with path.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: train (or resume) the run in ``config['run_dir']``.

    Args:
        config: ``run_dir`` (str), ``use_gpu`` (bool).
    """
    use_gpu = bool(config["use_gpu"])
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    elif "TORCH_CUDA_ARCH_LIST" in os.environ:  # before DeepSpeed builds FusedAdam
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    import ray.train

    from crucible.data_pipeline.reader import TrainingReader
    from crucible.jobs.runs import load_train_spec

    run_dir = location(config["run_dir"])
    spec = load_train_spec(run_dir)
    _quiet_third_party()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    make_deterministic(int(spec.train.cpus_per_worker))
    (run_dir / "workers" / f"rank-{rank}.pid").write_text(str(os.getpid()), durable=False)

    # Before the process group starts: the threads it and DeepSpeed start stay at normal
    # priority, Ray's threads in this process yield to them (see .priority).
    yield_rank_helpers()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    o, t = spec.optim, spec.train
    reader = TrainingReader(
        spec.data.shards,
        o.global_batch_size,
        rank=rank,
        world_size=world,
        seed=spec.data.seed,
        verify="size",  # the driver checked contents once; workers only check sizes
        allow_manifest_change=spec.data.allow_manifest_change,
        doc_index=spec.data.mask_cross_document,
    )
    plan = make_plan(spec, world, seq_len=reader.seq_len, use_gpu=use_gpu)
    root = run_dir / "checkpoints"
    root.mkdirs()
    chosen = choose_checkpoint(root, spec.checkpoint.verify, rank, world)
    state = ckpt.read_state(chosen[0]) if chosen else None
    reshard = state is not None and state["world_size"] != world
    tel = Telemetry(spec, plan, run_dir, rank, world, resumed_from=state["step"] if state else 0)
    metrics = open_metrics(run_dir) if rank == 0 else None
    engine = build_engine(spec, plan, universal=reshard)
    step = 0
    seed_everything(t.seed * 100_003 + rank)
    if chosen is not None and state is not None:
        path, local, manifest = chosen
        t_load = time.perf_counter()
        engine.load_checkpoint(
            str(local), tag=ckpt.DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        step = int(state["step"])
        if reshard:  # RNG streams are per rank: derive new ones from (seed, step, rank)
            seed_everything((t.seed * 100_003 + step) * 1_009 + rank)
        else:
            set_rng_state(
                torch.load(local / "crucible_state" / f"rank-{rank}.pt", weights_only=False)
            )
        reader.load_state_dict(state["reader"])
        seconds = time.perf_counter() - t_load
        nbytes = int(manifest["total_bytes"])
        tel.loaded(seconds, nbytes)
        if metrics is not None:
            say(
                f"resumed from {path.name} (world size {state['world_size']} → {world}) in "
                f"{seconds:.2f} s ({nbytes / seconds / 1e6:.1f} MB/s)"
            )
            metrics.append(
                {"kind": "resume", "step": step, "from": path.uri, "world_size": world,
                 "from_world_size": state["world_size"], "load_seconds": seconds,
                 "bytes": nbytes},
                sync=True,
            )  # fmt: skip
    heldout = None
    if t.eval_every:
        heldout = TrainingReader(
            spec.data.shards, o.global_batch_size, rank=rank, world_size=world, split="heldout",
            verify="size", doc_index=spec.data.mask_cross_document,
        )  # fmt: skip
    device = engine.device
    if rank == 0:
        say(
            f"training {spec.name}: steps {step}→{plan.total_steps}, {world} workers, "
            f"micro-batch {plan.micro_batch_size} × {plan.grad_accum_steps} accumulation"
        )
    tel.started(t.hang_timeout_s)
    status = "failed"
    try:
        while step < plan.total_steps:
            t0, t0_wall = time.perf_counter(), time.time()
            lr = lr_at(step, o, plan.total_steps)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            batch_index = reader.samples_consumed // o.global_batch_size
            batch = reader.next_batch()
            data_wait = time.perf_counter() - t0
            # On the device: NCCL reduces only device tensors, and a host copy per micro-batch
            # would stall the GPU's queue.
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for mb in _micro_batches(batch, plan.micro_batch_size, device):
                doc = mb.get("doc_index") if spec.data.mask_cross_document else None
                _, loss = engine(mb["input_ids"], mb["labels"], doc_ids=doc)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
            loss_avg = loss_sum / plan.grad_accum_steps
            dist.all_reduce(loss_avg)
            loss_val = float(loss_avg) / world
            if not math.isfinite(loss_val):
                if rank == 0:
                    _record_nan(run_dir, root, step, batch_index, loss_val, o.global_batch_size)
                status = "nan"
                return
            step += 1
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            seconds = time.perf_counter() - t0
            mfu = tel.step(
                step, loss_val, lr, grad_norm, plan.tokens_per_step, o.global_batch_size,
                t0_wall, seconds, data_wait,
            )  # fmt: skip
            record = {
                "kind": "step",
                "step": step,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": plan.tokens_per_step,
                "step_seconds": seconds,
                "data_wait_seconds": data_wait,
                "tokens_per_s": plan.tokens_per_step / seconds,
                "mfu": mfu,
            }
            if heldout is not None and step % t.eval_every == 0:
                e0 = time.time()
                record["heldout_loss"] = evaluate(
                    engine, heldout, t.eval_batches, plan, spec.data.mask_cross_document
                )
                tel.evaluated(record["heldout_loss"], e0, time.time())
            if metrics is not None:
                metrics.append(record | {"time": time.time()})
                if step % t.log_every == 0 or step == plan.total_steps:
                    say(_step_line(record, plan.total_steps))
            if step % spec.checkpoint.every_steps == 0 or step == plan.total_steps:
                c0 = time.time()
                state = {
                    "step": step,
                    "samples_consumed": reader.samples_consumed,
                    "reader": reader.state_dict(),
                    "world_size": world,
                    "total_steps": plan.total_steps,
                    "ledger": tel.ledger_state(use_gpu) or {"worker_seconds": 0.0},
                    "spec": spec.model_dump(mode="json"),
                }
                stats = save(engine, root, step, state, rank, world)
                if rank == 0:
                    deleted = ckpt.retain(
                        root, spec.checkpoint.keep_last, spec.checkpoint.keep_every
                    )
                    say(
                        f"checkpoint {stats.path.name}: {stats.bytes / 1e6:.2f} MB in "
                        f"{stats.seconds:.2f} s ({stats.bytes_per_s / 1e6:.1f} MB/s)"
                        + (
                            f"; removed {', '.join(f'step-{s}' for s in deleted)}"
                            if deleted
                            else ""
                        )
                    )
                    assert metrics is not None
                    metrics.append(
                        {"kind": "checkpoint", "step": step, "bytes": stats.bytes,
                         "save_seconds": stats.seconds, "path": stats.path.uri},
                        sync=True,
                    )  # fmt: skip
                # Ray Train's report is a barrier that waits for the controller's next poll
                # (every 2 s): once per checkpoint, not per step. Step metrics go to the job
                # log, metrics.jsonl and Prometheus.
                ray.train.report(
                    {k: v for k, v in record.items() if k != "kind"}
                    | {"checkpoint": stats.path.uri}
                )
                tel.checkpointed(step, stats.seconds, stats.bytes, c0)
        status = "finished"
    finally:
        if metrics is not None:
            metrics.close()
        tel.finish("failed" if status == "nan" else status)


def _step_line(record: dict[str, Any], total_steps: int) -> str:
    """The job log's line for one step."""
    held = f" heldout {record['heldout_loss']:.4f}" if "heldout_loss" in record else ""
    mfu = f" MFU {record['mfu']:.2%}" if record.get("mfu") is not None else ""
    return (
        f"step {record['step']}/{total_steps} loss {record['loss']:.4f}{held} "
        f"lr {record['lr']:.3e} grad_norm {record['grad_norm']:.3f} "
        f"tokens {record['tokens']:,} step {record['step_seconds']:.3f}s "
        f"{record['tokens_per_s']:,.0f} tok/s{mfu}"
    )


def _record_nan(
    run_dir: Location, root: Location, step: int, batch_index: int, loss: float, global_batch: int
) -> None:
    """Write ``nan.json`` (the driver turns it into the run's one-line error)."""
    last = ckpt.latest_committed(root)
    (run_dir / "nan.json").write_json(
        {"step": step + 1, "batch_index": batch_index, "loss": str(loss),
         "samples": [batch_index * global_batch, (batch_index + 1) * global_batch],
         "last_checkpoint": last[0].uri if last else None},
    )  # fmt: skip
