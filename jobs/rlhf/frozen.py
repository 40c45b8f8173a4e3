"""The two models a PPO run never trains: the reference policy (the policy's starting
weights, for the per-token KL) and the reward model (each answer's score).

``frozen.placement`` says where they run. ``colocated``: whole on every training worker,
beside the actor and the critic (OpenRLHF's ``--colocate_all_models``). ``separate``: in
``frozen.num_actors`` Ray actors with CPUs or a GPU of their own, so a large reference or
reward model does not take a training GPU's memory (OpenRLHF's separate reference and
reward groups); each worker sends its rows and answers to actor ``rank mod num_actors``
and gets the log-probabilities and scores back. Both placements compute the same numbers:
the same forwards on the same rows, and on the CPU the same thread count.
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
    """

    def __init__(
        self, run_dir: str, reward: str, temperature: float, device: str,
        threads: int | None = None,
    ) -> None:  # fmt: skip
        from safetensors.torch import load_file

        from crucible.jobs.finetune.base import local_weights
        from crucible.jobs.rlhf.rejection import RewardScorer
        from crucible.jobs.runs import load_run_spec
        from crucible.model.gpt import GPT, build_model

        if threads is not None:
            from crucible.jobs.train.state import make_deterministic

            make_deterministic(threads)
        self.device = torch.device(device)
        self.temperature = temperature
        run = location(run_dir)
        cfg = load_run_spec(run).model.resolve()  # type: ignore[union-attr]
        ref: GPT = build_model(cfg, device="meta")
        sd = load_file(str(local_weights(run / "init" / "policy")))
        ref.load_state_dict(sd, strict=not cfg.tie_embeddings, assign=True)
        if cfg.tie_embeddings:
            ref.lm_head.weight = ref.tok_emb.weight
        self.ref = ref.to(self.device).eval()
        for p in self.ref.parameters():
            p.requires_grad_(False)
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
