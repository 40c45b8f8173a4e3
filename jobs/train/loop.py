"""The per-worker train function that Ray Train's ``TorchTrainer`` (or, on one node without
Ray, ``torchrun``: :mod:`.standalone`) runs on every rank.

Each worker builds the GPT sharded under ZeRO-3 (config from :mod:`.plan`), resumes from the
newest checkpoint every rank can load, then for each optimizer step reads its slice of the
global batch, runs ``grad_accum_steps`` micro-batches at the LR of :func:`.lr_at`, and hands
the step to the callbacks (:mod:`.callbacks`: ledger, metrics, watchdog, evaluation, logs,
checkpoints) once the rollback callback has judged it (a loss spike or a non-finite loss
goes back to the last checkpoint). The same function runs after a worker-group restart, so
recovery is just "start again". Callbacks never touch the RNG streams or the tensors being
trained, so a monitored run is bitwise the run it would have been.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from crucible.cluster.plan import RunPlan, plan_run
from crucible.cluster.storage import location
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.callbacks import (
    CheckpointerCallback,
    RollbackCallback,
    StepResult,
    StopCallback,
    TrainContext,
    build_callbacks,
)
from crucible.jobs.train.engine import build_engine, micro_batches, model_inputs
from crucible.jobs.train.environment import prepare_process
from crucible.jobs.train.launcher import current_launcher
from crucible.jobs.train.resume import rank_seed, restore
from crucible.jobs.train.schedule import lr_at
from crucible.jobs.train.state import make_deterministic, seed_everything

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: train (or resume) the run in ``config['run_dir']``.

    Args:
        config: ``run_dir`` (str), ``use_gpu`` (bool).
    """
    use_gpu = bool(config["use_gpu"])
    prepare_process(use_gpu)  # before anything imports DeepSpeed
    import deepspeed

    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.jobs.runs import load_train_spec

    run_dir = location(config["run_dir"])
    spec = load_train_spec(run_dir)
    launcher = current_launcher()
    rank, world = launcher.rank, launcher.world_size
    make_deterministic(int(spec.train.cpus_per_worker))
    (run_dir / "workers" / f"rank-{rank}.pid").write_text(str(os.getpid()), durable=False)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    o = spec.optim
    reader = TrainingReader(
        spec.data.shards,
        o.global_batch_size,
        rank=rank,
        world_size=world,
        seed=spec.data.seed,
        verify="size",  # the driver checked contents once; workers only check sizes
        allow_manifest_change=spec.data.allow_manifest_change,
        doc_index=spec.data.mask_cross_document,
        mlm=spec.objective if spec.objective.kind == "mlm" else None,
    )
    plan = plan_run(spec, world, seq_len=reader.seq_len, use_gpu=use_gpu)
    ctx = TrainContext(spec, plan, run_dir, rank, world, use_gpu, reader, launcher=launcher)
    ctx.checkpoints.mkdirs()
    chosen = ckpt.choose_checkpoint(ctx.checkpoints, spec.checkpoint.verify, rank, world)
    state = ckpt.read_state(chosen[0]) if chosen else None
    ctx.callbacks = build_callbacks(ctx, resumed_from=state["step"] if state else 0)
    rollback = ctx.callbacks.find(RollbackCallback)
    stopper = ctx.callbacks.find(StopCallback)
    checkpointer = ctx.callbacks.find(CheckpointerCallback)
    base = run_dir / "base" if getattr(spec, "base", None) is not None else None
    ctx.engine = build_engine(
        spec, plan, universal=bool(state and state["world_size"] != world), base=base, rank=rank
    )
    seed_everything(rank_seed(spec.train.seed, rank))
    if chosen is not None and state is not None:
        resumed = restore(ctx, chosen, state)
        ctx.step = resumed.step
        ctx.callbacks.on_resume(resumed)
    ctx.callbacks.on_start()
    status = "failed"
    try:
        while ctx.step < plan.total_steps and not ctx.stop_requested:
            t0, t0_wall = time.perf_counter(), time.time()
            lr = lr_at(ctx.step, o, plan.total_steps)
            for group in ctx.engine.optimizer.param_groups:
                group["lr"] = lr
            batch = reader.next_batch()
            data_wait = time.perf_counter() - t0
            loss_sum, engine_seconds, save_wait = train_step(
                ctx.engine, batch, plan, before_update=checkpointer.wait_staged
            )
            loss_avg = loss_sum / plan.grad_accum_steps
            dist.all_reduce(loss_avg)
            loss = float(loss_avg) / world
            grad_norm = ctx.engine.get_global_grad_norm()
            if not rollback.healthy(ctx.step + 1, reader.last_batch, loss, grad_norm, t0_wall):
                if rollback.gave_up:
                    return
                continue  # rolled back: the step and the data position are the checkpoint's
            ctx.step += 1
            result = StepResult(
                step=ctx.step,
                loss=loss,
                lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                tokens=plan.tokens_per_step,
                samples=o.global_batch_size,
                started=t0_wall,
                seconds=time.perf_counter() - t0,
                data_wait_seconds=data_wait,
                engine_seconds=engine_seconds,
                checkpoint_wait_seconds=save_wait,
            )
            ctx.callbacks.on_step_end(result)
        status = stopper.ending(plan.total_steps)
    finally:
        ctx.callbacks.on_end(status)
    if status == "preempted":  # an error, not a return: Ray Train restarts from its checkpoint
        raise stopper.preempted()


def train_step(
    engine: DeepSpeedEngine,
    batch: dict[str, torch.Tensor],
    plan: RunPlan,
    before_update: Callable[[], float] | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Forward, backward and step over this rank's micro-batches of one global batch; return
    the sum of their losses (on the device), the seconds spent in the engine and the part of
    them ``before_update`` waited.

    Args:
        engine: the DeepSpeed engine (it steps the optimizer at the accumulation boundary).
        batch: this rank's slice of the global batch.
        plan: the plan (micro-batch size).
        before_update: called once the gradients are ready, before the optimizer changes
            the weights (an asynchronous save's copy of the state must be done by then);
            returns the seconds it waited.
    """
    device = engine.device
    mbs = micro_batches(batch, plan.micro_batch_size, device)
    # On the device: NCCL reduces only device tensors, and a host copy per micro-batch would
    # stall the GPU's queue.
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    waited = 0.0
    for mb in mbs:
        _, loss = engine(mb["input_ids"], mb["labels"], **model_inputs(mb))
        engine.backward(loss)
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            waited += before_update()
        engine.step()
        loss_sum += loss.detach().float()
    if device.type == "cuda":  # the engine's kernels end here, not at the loss read after
        torch.cuda.synchronize(device)
    return loss_sum, time.perf_counter() - t0, waited
