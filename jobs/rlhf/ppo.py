"""PPO (``kind: ppo``, InstructGPT's third step): the policy optimised against a reward
model's scores, with a per-token KL penalty to the policy it started as.

The driver converts the starting weights once (``<run>/init/``: the policy's, and the reward
model's for the value model, as InstructGPT initialises it), then runs one Ray Train worker
group. Every worker holds the actor and the critic, trained by DeepSpeed at the spec's ZeRO
stage; the frozen reference and reward model are whole on every worker (``frozen.placement:
colocated``, OpenRLHF's colocated placement) or in Ray actors of their own (``separate``;
see :mod:`.frozen`). A PPO step, on every worker for its slice of the step's prompts:

1. rollout: one answer per prompt sampled from the actor (crucible's batched generation;
   lock-step under ZeRO-3, where every rank must run the same forwards);
2. scoring: the reward model's score of each answer (rendered as its training data was), the
   actor's, reference's and critic's view of every answer token;
3. advantages: per-token rewards (KL penalty, the score on the last token), GAE, whitening
   over the whole batch;
4. updates: ``ppo.epochs`` passes of ``ppo.mini_batches`` optimizer steps of each model.

The worker is :mod:`.ppo_worker` (a resume at the same world size is exact), the arithmetic
:mod:`.ppo_math`, the checkpoints :mod:`.ppo_checkpoint`. Each step's figures go to
``metrics.jsonl`` (``kind: ppo``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from crucible.cluster.storage import Location, location, sha256_file
from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from crucible.jobs.spec import PPORunSpec

CRITIC_TAG = "critic"


def check_ppo(spec: PPORunSpec) -> None:
    """Before submitting: the inputs (as rejection sampling checks them), that the reward
    model reads the policy's tokens (its trunk becomes the value model) and that each step's
    prompts split evenly into workers and mini-batches.

    Raises:
        CrucibleError: the first problem, in one line.
    """
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.rlhf.rejection import check_inputs, policy_shards

    check_inputs(spec)
    mine = read_manifest(spec.data.shards).tokenizer.fingerprint
    theirs = read_manifest(policy_shards(spec.reward)).tokenizer.fingerprint
    if mine != theirs:
        raise CrucibleError(
            f"reward: {spec.reward} uses another tokenizer than the policy; the value model "
            "starts from the reward model, so train it on shards with the policy's tokenizer"
        )
    from crucible.model.spec import ModelSpec

    reward_model = ModelSpec.model_validate(_state_spec(spec.reward)["model"]).resolve()
    if reward_model.vocab_size != spec.model.resolve().vocab_size:
        raise CrucibleError(f"reward: {spec.reward} has another vocabulary size than the policy")
    per = spec.rollout.prompts_per_step
    parts = spec.workers.num_workers * spec.ppo.mini_batches
    if per % parts:
        raise CrucibleError(
            f"rollout.prompts_per_step {per} must be a multiple of workers.num_workers x "
            f"ppo.mini_batches ({parts})"
        )


def _state_spec(checkpoint: str) -> dict[str, Any]:
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.export import resolve_checkpoint

    spec: dict[str, Any] = ckpt.read_state(resolve_checkpoint(checkpoint))["spec"]
    return spec


def convert_weights(checkpoint: str, out: str, reward: bool) -> str:
    """Write a checkpoint's consolidated weights as ``<out>/model.safetensors`` and
    ``info.json`` (the layout a finetune's base has, which every worker loads); a Ray task.

    Args:
        checkpoint: the policy or reward checkpoint.
        out: where to write (a URI).
        reward: the checkpoint is a reward model's.
    """
    from safetensors.torch import save_file

    from crucible.jobs.finetune.base import INFO, WEIGHTS
    from crucible.jobs.train.export import load_model, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    model = load_model(path, reward_ok=reward)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    dest = location(out)
    with (dest / WEIGHTS).writing() as pending:
        save_file(sd, str(pending.path))
        digest, size = sha256_file(pending.path), pending.path.stat().st_size
    info = {"source": path.uri, "parameters": sum(v.numel() for v in sd.values()),
            "sha256": digest, "bytes": size}  # fmt: skip
    (dest / INFO).write_text(json.dumps(info, indent=1))
    return out


def run_ppo(run_dir: Location) -> int:
    """The job's driver: check, convert the starting weights, run the worker group.

    Args:
        run_dir: the run directory (its resolved spec is a PPO spec).
    """
    import ray

    from crucible.jobs.finetune.base import INFO
    from crucible.jobs.rlhf.frozen import frozen_use_gpu, start_frozen_actors
    from crucible.jobs.rlhf.ppo_worker import ppo_loop_per_worker
    from crucible.jobs.runs import load_run_spec
    from crucible.jobs.spec import PPORunSpec
    from crucible.jobs.train.export import resolve_checkpoint
    from crucible.jobs.train.run import (
        check_worker_resources,
        start_metrics_registry,
        worker_group,
    )

    spec = load_run_spec(run_dir)
    assert isinstance(spec, PPORunSpec)
    check_ppo(spec)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    start_metrics_registry()  # the workers' metrics are found through it
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    w = spec.workers
    use_gpu = bool(resources.get("GPU", 0)) if w.use_gpu is None else w.use_gpu
    check_worker_resources(w.num_workers, w.cpus_per_worker, resources, use_gpu, "workers")
    f = spec.frozen
    separate = f.placement == "separate"
    if separate:  # the actors need what the workers leave
        left = {"CPU": resources.get("CPU", 0) - w.num_workers * w.cpus_per_worker,
                "GPU": resources.get("GPU", 0) - (w.num_workers if use_gpu else 0)}  # fmt: skip
        frozen_gpu = frozen_use_gpu(spec, resources)
        check_worker_resources(
            f.num_actors, f.cpus_per_actor, left, frozen_gpu, "frozen",
            ("num_actors", "cpus_per_actor"),
        )  # fmt: skip
    from crucible.jobs.rlhf.ppo_checkpoint import CRITIC_TAG
    from crucible.jobs.train.checkpoint import DS_TAG
    from crucible.jobs.train.run import prepare_reshard

    root = run_dir / "checkpoints"
    root.mkdirs()
    prepare_reshard(root, w.num_workers, (DS_TAG, CRITIC_TAG))
    t0 = time.perf_counter()
    todo = []
    for name, source, reward in (("policy", spec.policy, False), ("critic", spec.reward, True)):
        out = run_dir / "init" / name
        path = resolve_checkpoint(source)
        if not ((out / INFO).is_file() and (out / INFO).read_json().get("source") == path.uri):
            todo.append(ray.remote(num_cpus=1)(convert_weights).remote(path.uri, out.uri, reward))
    ray.get(todo)
    print(f"starting weights ready in {run_dir / 'init'} ({time.perf_counter() - t0:.1f} s)",
          flush=True)  # fmt: skip
    extra: dict[str, Any] = {}
    if separate:
        t0 = time.perf_counter()
        extra["frozen"] = start_frozen_actors(spec, run_dir.uri, frozen_gpu)
        print(f"reference and reward models in {f.num_actors} actor(s) of their own "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)  # fmt: skip
    trainer = worker_group(
        ppo_loop_per_worker, run_dir, use_gpu, w.num_workers, w.cpus_per_worker,
        w.max_failures, extra=extra,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit()
    print(summarize(run_dir, time.perf_counter() - t0), flush=True)
    return 0


def summarize(run_dir: Location, seconds: float) -> str:
    """The job log's last lines: the first and last steps' score and KL."""
    from crucible.cluster.storage import read_jsonl

    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "ppo"]
    lines = [f"PPO ran in {seconds:.1f} s"]
    if steps:
        a, b = steps[0], steps[-1]
        lines.append(
            f"step {a['step']}: score {a['score_mean']:.4f}, KL {a['kl']:.4f}; step {b['step']}: "
            f"score {b['score_mean']:.4f}, KL {b['kl']:.4f}"
        )
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)
