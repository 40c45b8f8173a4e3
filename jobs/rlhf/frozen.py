"""The two models a PPO run never trains: the reference policy (the policy's starting
weights, for the per-token KL) and the reward model (each answer's score).

``frozen.placement`` says where they run. ``colocated``: on every training worker, beside
the actor and the critic (OpenRLHF's ``--colocate_all_models``); under ZeRO-3 they are
partitioned over the workers as the actor is (in fp32, with no optimizer), so no rank holds
either whole, and every rank runs their forward passes at the same time. ``separate``: in
``frozen.num_actors`` Ray actors with CPUs or a GPU of their own, so a large reference or
reward model does not take a training GPU's memory (OpenRLHF's separate reference and
reward groups); each worker sends its rows and answers to actor ``rank mod num_actors``
and gets the log-probabilities and scores back. Both placements run the same forwards on the
same rows in fp32 (on the CPU with the same thread count); a partitioned forward runs on
gathered parameters at other addresses, so on some CPUs the kernels sum in another order
and the numbers differ in the last bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.storage import location

if TYPE_CHECKING:
    from crucible.jobs.spec import PPORunSpec

Pairs = list[tuple[list[tuple[str, str]], str]]


class FrozenModels:
    """The reference and the reward model of a PPO run, on one device.

    Args:
        run_dir: the run directory's URI (the reference is ``<run>/init/policy``).
        reward: the reward checkpoint (or run directory).
        temperature: the rollout's temperature (log-probabilities are of the sampled
            distribution, as the actor's are).
        device: where the models run (``cpu`` or ``cuda:N``).
        threads: intra-op threads on the CPU (None: leave torch's).
        zero3: partition both models over the process group, ZeRO-3 (a collective: every
            rank builds them, then calls their methods in the same order).
    """

    def __init__(
        self, run_dir: str, reward: str, temperature: float, device: str,
        threads: int | None = None, zero3: bool = False,
    ) -> None:  # fmt: skip
        from crucible.jobs.rlhf.rejection import RewardScorer
        from crucible.jobs.runs import load_run_spec
        from crucible.model.gpt import GPT

        if threads is not None:
            from crucible.jobs.train.state import make_deterministic

            make_deterministic(threads)
        self.device = torch.device(device)
        self.temperature = temperature
        run = location(run_dir)
        spec = load_run_spec(run)
        if zero3:
            from crucible.model.reward import RewardModel

            self.ref: Any = _partitioned(spec, run / "init" / "policy", GPT)
            model = _partitioned(spec, run / "init" / "critic", RewardModel)
            self.scorer = RewardScorer(reward, self.device, model=model, lockstep=True)
        else:
            self.ref = _whole(spec, run / "init" / "policy").to(self.device)
            self.scorer = RewardScorer(reward, self.device)

    def ready(self) -> bool:
        """True once both models are loaded (an actor's first call waits for that)."""
        return True

    def ref_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's log-probability of each next token [B, L−1], on ``tokens``'
        device.

        Args:
            tokens: prompt + answer rows [B, L].
        """
        from crucible.jobs.rlhf import ppo_math as pm

        with torch.no_grad():
            rows = tokens.to(self.device)
            logits = self.ref(rows)[0][:, :-1]
            out = pm.token_logprobs(logits.float() / self.temperature, rows[:, 1:])
        return out.to(tokens.device)

    def score(self, pairs: Pairs) -> list[float]:
        """The reward model's score of each ``(prompt turns, answer)`` (-inf: unscorable).

        Args:
            pairs: prompt turns and an answer each.
        """
        return self.scorer.score(pairs)


def _whole(spec: Any, weights: Any) -> torch.nn.Module:
    """The policy's starting weights in one plain, frozen GPT."""
    from safetensors.torch import load_file

    from crucible.jobs.finetune.base import local_weights
    from crucible.model.gpt import GPT, build_model

    cfg = spec.model.resolve()
    ref: GPT = build_model(cfg, device="meta")
    sd = load_file(str(local_weights(weights)))
    ref.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        ref.lm_head.weight = ref.tok_emb.weight
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _partitioned(spec: Any, weights: Any, cls: type) -> Any:
    """A frozen model of ``cls`` with ``weights``, partitioned by ZeRO-3 over the process
    group: a DeepSpeed engine without an optimizer, in fp32."""
    import deepspeed
    import torch.distributed as dist

    from crucible.jobs.finetune.base import load_base
    from crucible.model.accounting import num_params
    from crucible.model.parallelize import build_deepspeed_config, build_zero3_model

    cfg = spec.model.resolve()
    parallel = spec.model.parallel.model_copy(
        update={"precision": "fp32", "offload_optimizer": "none"}
    )
    config = build_deepspeed_config(
        parallel, micro_batch_size=1, grad_accum_steps=1, world_size=dist.get_world_size(),
        grad_clip=None, num_params=num_params(cfg),
    )  # fmt: skip
    model = build_zero3_model(cfg, config, init=False, cls=cls)
    load_base(model, weights, dist.get_rank())
    for p in model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # (DeepSpeed's returns None)
    return engine


class RemoteFrozen:
    """A worker's view of a :class:`FrozenModels` Ray actor: the same two methods.

    Args:
        actor: the actor's handle.
    """

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def ref_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """As :meth:`FrozenModels.ref_logprobs`; the rows travel through Ray's object store."""
        import ray

        out: torch.Tensor = ray.get(self.actor.ref_logprobs.remote(tokens.cpu()))
        return out.to(tokens.device)

    def score(self, pairs: Pairs) -> list[float]:
        """As :meth:`FrozenModels.score`."""
        import ray

        scores: list[float] = ray.get(self.actor.score.remote(pairs))
        return scores


def frozen_use_gpu(spec: PPORunSpec, resources: dict[str, float]) -> bool:
    """Whether each separate frozen actor takes a GPU (``frozen.use_gpu``, or the cluster's
    GPUs when it is null)."""
    use = spec.frozen.use_gpu
    return bool(resources.get("GPU", 0)) if use is None else use


def start_frozen_actors(spec: PPORunSpec, run_dir: str, use_gpu: bool) -> list[Any]:
    """The separate placement's actors, each holding both frozen models (ready when this
    returns: a model that cannot load fails the job here, not in a worker).

    Args:
        spec: the PPO spec (``frozen.placement: separate``).
        run_dir: the run directory's URI; its ``init/policy`` is written.
        use_gpu: one GPU per actor.
    """
    import ray

    f = spec.frozen
    cls = ray.remote(FrozenModels).options(  # type: ignore[attr-defined]
        num_cpus=f.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        max_restarts=spec.workers.max_failures,
        max_task_retries=spec.workers.max_failures,  # both methods are pure functions
    )
    device = "cuda:0" if use_gpu else "cpu"  # Ray sets the actor's CUDA_VISIBLE_DEVICES
    threads = None if use_gpu else max(1, int(f.cpus_per_actor))
    actors = [
        cls.remote(run_dir, spec.reward, spec.rollout.temperature, device, threads)
        for _ in range(f.num_actors)
    ]
    ray.get([a.ready.remote() for a in actors])  # type: ignore[attr-defined]
    return actors
