"""One rank of a PPO run (see :mod:`.ppo`): its four models, its slice of each step's
prompts, the rollout, the advantages and the updates.

Prompts are taken in a seeded order that is a pure function of the step; sampling and
shuffling use generators seeded by (seed, step, rank), so a resume at the same world size
repeats the steps it redoes exactly. A resume with another number of workers loads the
checkpoint's universal copy (converted by the driver) and goes on from the same step and
prompts, with other samples.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError
from crucible.jobs.rlhf import ppo_math as pm
from crucible.jobs.rlhf.frozen import FrozenModels, RemoteFrozen
from crucible.jobs.rlhf.ppo_checkpoint import choose, resume, save
from crucible.jobs.rlhf.ppo_monitor import open_ledger, start_metrics, stop_metrics
from crucible.jobs.rlhf.rejection import decode_answer
from crucible.jobs.train.console import say

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from crucible.jobs.spec import PPORunSpec


def ppo_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: run (or resume) the PPO run in ``config['run_dir']``.

    Args:
        config: ``run_dir`` (str), ``use_gpu`` (bool), ``frozen`` (the separate frozen
            models' actor handles, or absent).
    """
    from crucible.jobs.train.environment import prepare_process

    use_gpu = bool(config["use_gpu"])
    prepare_process(use_gpu)  # before anything imports DeepSpeed
    import deepspeed

    from crucible.jobs.runs import load_run_spec
    from crucible.jobs.train.launcher import current_launcher
    from crucible.jobs.train.state import make_deterministic

    run_dir = location(config["run_dir"])
    spec = load_run_spec(run_dir)
    launcher = current_launcher()
    make_deterministic(int(spec.workers.cpus_per_worker))  # type: ignore[union-attr]
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    frozen = config.get("frozen")
    PPOWorker(spec, run_dir, launcher.rank, launcher.world_size, use_gpu, frozen).run()  # type: ignore[arg-type]


class PPOWorker:
    """One rank of a PPO run: its models, prompts and state.

    Args:
        spec: the PPO spec.
        run_dir: the run directory.
        rank: this rank.
        world: the number of ranks.
        use_gpu: whether this rank has a GPU.
        frozen_actors: the separate placement's actors (None: the frozen models are loaded
            here).
    """

    def __init__(
        self, spec: PPORunSpec, run_dir: Location, rank: int, world: int, use_gpu: bool,
        frozen_actors: list[Any] | None = None,
    ) -> None:  # fmt: skip
        from crucible.data_pipeline.chat import TEMPLATES
        from crucible.data_pipeline.shards.manifest import read_manifest
        from crucible.jobs.cli.generate import run_tokenizer

        self.spec, self.run_dir, self.rank, self.world = spec, run_dir, rank, world
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        )
        self.use_gpu = use_gpu
        self.tok, self.eos = run_tokenizer(spec.data.shards)
        template = read_manifest(spec.data.shards).chat_template
        if template is None:
            raise CrucibleError(f"{spec.policy} was not trained on chat shards")
        self.template = TEMPLATES[template]
        self.skipped: Counter[str] = Counter()
        self.prompts = self._encode_prompts()
        self.zero3 = spec.model.parallel.zero_stage == 3
        # the checkpoint to resume from is chosen before the engines exist: one saved by
        # another number of workers is loaded from its universal copy, configured at build
        self.resume_from = choose(self)
        saved_world = int(self.resume_from[3]["world_size"]) if self.resume_from else world
        self.universal = saved_world != world
        self.actor = self._engine("policy", critic=False)
        self.critic = self._engine("critic", critic=True)
        self.frozen: FrozenModels | RemoteFrozen
        if frozen_actors:
            self.frozen = RemoteFrozen(frozen_actors[rank % len(frozen_actors)])
        else:
            self.frozen = FrozenModels(
                run_dir.uri, spec.reward, spec.rollout.temperature, str(self.device),
                zero3=self.zero3,
            )  # fmt: skip
        self.kl = pm.KLController(spec.ppo.kl_coef, spec.ppo.kl_target, spec.ppo.kl_horizon)
        self.score_stats = pm.RunningMoments()
        self.step = 0

    # --- set-up ---------------------------------------------------------------------------

    def _encode_prompts(self) -> list[tuple[list[tuple[str, str]], list[int]]]:
        from crucible.data_pipeline.chat import generation_prompt
        from crucible.jobs.rlhf.rejection import read_prompts

        cfg = self.spec.model.resolve()
        out = []
        for item in read_prompts(self.spec.prompts, self.skipped):
            ids = self.tok.encode(generation_prompt(item["turns"], self.template)).ids
            if len(ids) + self.spec.rollout.max_new_tokens > cfg.max_seq_len:
                self.skipped["too_long_for_context"] += 1
            else:
                out.append((item["turns"], ids))
        if not out:
            raise CrucibleError(f"no usable prompts in {', '.join(self.spec.prompts)} "
                                f"(skipped: {dict(self.skipped)})")  # fmt: skip
        return out

    def _ds_config(self, lr: float) -> dict[str, Any]:
        from crucible.model.accounting import num_params
        from crucible.model.parallelize import build_deepspeed_config

        s = self.spec
        params: dict[str, Any] = {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                  "weight_decay": s.optim.weight_decay, "adam_w_mode": True}  # fmt: skip
        if not self.use_gpu:
            params["torch_adam"] = True
        per_rank = s.rollout.prompts_per_step // self.world // s.ppo.mini_batches
        return build_deepspeed_config(
            s.model.parallel, micro_batch_size=per_rank, grad_accum_steps=1,
            world_size=self.world, grad_clip=s.ppo.max_grad_norm,
            optimizer={"type": "AdamW", "params": params},
            num_params=num_params(self.spec.model.resolve()),
        )  # fmt: skip

    def _engine(self, name: str, critic: bool) -> DeepSpeedEngine:
        import deepspeed

        from crucible.jobs.finetune.base import load_base
        from crucible.jobs.train import hashing_engine
        from crucible.jobs.train.engine import param_groups
        from crucible.model.gpt import GPT, build_model
        from crucible.model.parallelize import build_zero3_model, parallelize
        from crucible.model.reward import RewardModel

        s = self.spec
        cfg = s.model.resolve()
        cls = RewardModel if critic else GPT
        config = self._ds_config(s.optim.critic_lr if critic else s.optim.actor_lr)
        if self.universal:
            config["checkpoint"] = {"load_universal": True}
        if self.zero3:
            model = build_zero3_model(cfg, config, seed=s.workers.seed, init=False, cls=cls)
        else:
            model = build_model(cfg, device="cpu", cls=cls)
        load_base(model, self.run_dir / "init" / name, self.rank)
        if not critic and cfg.tie_embeddings and not self.zero3:
            model.lm_head.weight = model.tok_emb.weight
        model = parallelize(model, s.model.parallel)
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, s.optim.weight_decay), config=config
        )
        hashing_engine.install(engine)
        return engine

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        from crucible.jobs.train.callbacks.runlog import open_metrics

        root = self.run_dir / "checkpoints"
        resume(self)
        log = open_metrics(self.run_dir) if self.rank == 0 else None
        ledger = open_ledger(self)
        metrics, port = start_metrics(self) or (None, None)
        s = self.spec
        if self.rank == 0:
            if isinstance(self.frozen, RemoteFrozen):
                where = f"in {s.frozen.num_actors} actor(s) of their own"
            else:
                where = "partitioned by ZeRO-3" if self.zero3 else "whole on every worker"
            say(f"PPO: {len(self.prompts)} prompts ({dict(self.skipped) or 'none'} skipped), "
                  f"{s.rollout.prompts_per_step} per step on {self.world} worker(s), steps "
                  f"{self.step + 1}-{s.ppo.steps}; reference and reward model {where}")  # fmt: skip
        try:
            while self.step < s.ppo.steps:
                t0 = time.time()
                record = self.ppo_step()
                self.step += 1
                if ledger is not None:
                    ledger.step(self.step, t0, time.time())
                if metrics is not None:
                    metrics.on_step(self.step, record)
                if log is not None:
                    log.append({"kind": "ppo", "step": self.step, **record, "time": time.time()})
                    say(step_line(self.step, s.ppo.steps, record))
                if self.step % s.checkpoint.every_steps == 0 or self.step == s.ppo.steps:
                    t0 = time.time()
                    save(self, root, log)
                    if ledger is not None:
                        ledger.checkpoint(self.step, t0, time.time())
        finally:
            if log is not None:
                log.close()
            if ledger is not None:
                ledger.end("finished" if self.step >= s.ppo.steps else "failed")
            if port is not None:
                stop_metrics(port, self.rank)

    def step_prompts(self) -> list[tuple[list[tuple[str, str]], list[int]]]:
        """This rank's share of the current step's prompts: global positions
        ``step·P … step·P + P − 1`` of an endless, per-pass reshuffled order."""
        n, per = len(self.prompts), self.spec.rollout.prompts_per_step
        out = []
        for i in range(self.step * per + self.rank, (self.step + 1) * per, self.world):
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.spec.workers.seed * 7919 + i // n)
            )
            out.append(self.prompts[int(order[i % n])])
        return out

    def _seed(self, salt: int) -> int:
        """A seed of (seed, step, rank, salt): the same after a resume."""
        return ((self.spec.workers.seed * 100_003 + self.step) * 1_009 + self.rank) * 101 + salt

    def ppo_step(self) -> dict[str, float]:
        """One rollout, its advantages and the updates; the step's figures (all ranks')."""
        import torch.distributed as dist

        from crucible.model.generate import generate

        s, r = self.spec, self.spec.rollout
        items = self.step_prompts()
        t0 = time.perf_counter()
        outs = generate(
            self.actor.module, [ids for _, ids in items], r.max_new_tokens, r.temperature,
            r.top_k, r.top_p, {self.eos}, generator=torch.Generator(device=self.device).manual_seed(self._seed(0)),
            lockstep=self.zero3,
        )  # fmt: skip
        gen_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = [decode_answer(self.tok, o, self.eos, self.template) for o in outs]
        scores = torch.tensor(
            self.frozen.score([(turns, a) for (turns, _), a in zip(items, answers, strict=True)])
        )
        unscorable = int((~torch.isfinite(scores)).sum())
        if unscorable:  # a marker in the answer or too long for the reward model: the worst
            finite = scores[torch.isfinite(scores)]
            scores[~torch.isfinite(scores)] = finite.min() if finite.numel() else 0.0
        score_seconds = time.perf_counter() - t0
        tokens, mask = self._rows([ids for _, ids in items], outs)
        t1 = time.perf_counter()
        with torch.no_grad():
            old_lp = self._logprobs(self.actor, tokens)
            ref_lp = self.frozen.ref_logprobs(tokens)
            old_values = self.critic(tokens)[0][:, :-1].float()
        raw = scores.to(self.device)
        used = self.score_stats.normalize(raw) if s.ppo.normalize_rewards else raw
        rewards, kl = pm.token_rewards(used, old_lp, ref_lp, mask, self.kl.coef)
        adv, returns = pm.gae(rewards, old_values, mask, s.ppo.gamma, s.ppo.lam)
        if s.ppo.whiten_advantages:
            mean, var = pm.global_moments(adv, mask)
            adv = pm.whiten(adv, mask, mean, var)
        stats = self._update(tokens, mask, old_lp, old_values, adv, returns)
        train_seconds = time.perf_counter() - t1
        per_seq_kl = kl.sum(1)
        totals = torch.stack([
            raw.sum(), (raw**2).sum(), per_seq_kl.sum(), (used - self.kl.coef * per_seq_kl).sum(),
            mask.sum(), torch.tensor(float(len(items)), device=self.device),
            torch.tensor(float(unscorable), device=self.device),
            torch.tensor(float(sum(len(o) for o in outs)), device=self.device),
            torch.tensor(float(tokens.numel()), device=self.device),
        ]).double()  # fmt: skip
        dist.all_reduce(totals)
        n = float(totals[5])
        mean_score = float(totals[0]) / n
        record = {
            "score_mean": mean_score,
            "score_std": math.sqrt(max(float(totals[1]) / n - mean_score**2, 0.0)),
            "kl": float(totals[2]) / n,
            "reward_mean": float(totals[3]) / n,
            "kl_coef": self.kl.coef,
            "response_tokens_mean": float(totals[4]) / n,
            "unscorable": int(totals[6]),
            **stats,
            "generated_tokens": int(totals[7]),
            "rollout_tokens": int(totals[8]),
            "generation_seconds": gen_seconds,
            "generation_tokens_per_s": float(totals[7]) / max(gen_seconds, 1e-9) / self.world,
            "score_seconds": score_seconds,
            "train_seconds": train_seconds,
            "train_tokens_per_s": float(tokens.numel()) * self.world / max(train_seconds, 1e-9),
        }
        self.kl.update(record["kl"], int(n))
        return record

    def _rows(
        self, prompts: list[list[int]], outs: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + answer rows right-padded [B, L], and the mask [B, L−1] of the positions
        whose next token is an answer token (the actions)."""
        width = max(len(p) + len(o) for p, o in zip(prompts, outs, strict=True))
        tokens = torch.full((len(prompts), width), self.eos, dtype=torch.long)
        mask = torch.zeros((len(prompts), width - 1))
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            tokens[i, : len(p) + len(o)] = torch.tensor(p + o)
            mask[i, len(p) - 1 : len(p) - 1 + len(o)] = 1
        return tokens.to(self.device), mask.to(self.device)

    def _logprobs(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens)[0][:, :-1]
        return pm.token_logprobs(logits.float() / self.spec.rollout.temperature, tokens[:, 1:])

    def _update(
        self, tokens: torch.Tensor, mask: torch.Tensor, old_lp: torch.Tensor,
        old_values: torch.Tensor, adv: torch.Tensor, returns: torch.Tensor,
    ) -> dict[str, float]:  # fmt: skip
        p = self.spec.ppo
        n = tokens.shape[0]
        per = n // p.mini_batches
        sums: Counter[str] = Counter()
        count = 0
        self.actor.train()
        self.critic.train()
        for epoch in range(p.epochs):
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self._seed(1 + epoch))
            )
            for m in range(p.mini_batches):
                idx = order[m * per : (m + 1) * per].to(self.device)
                lp = self._logprobs(self.actor, tokens[idx])
                loss, clip_frac, approx_kl = pm.policy_loss(
                    lp, old_lp[idx], adv[idx], mask[idx], p.clip_range
                )
                self.actor.backward(loss)
                self.actor.step()
                values = self.critic(tokens[idx])[0][:, :-1].float()
                vloss, vclip = pm.value_loss(
                    values, old_values[idx], returns[idx], mask[idx], p.value_clip_range
                )
                self.critic.backward(vloss)
                self.critic.step()
                sums.update({"policy_loss": float(loss), "clip_frac": float(clip_frac),
                             "approx_kl": float(approx_kl), "value_loss": float(vloss),
                             "value_clip_frac": float(vclip)})  # fmt: skip
                count += 1
        import torch.distributed as dist

        keys = sorted(sums)
        t = torch.tensor([sums[k] / count for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t, strict=True)}


def step_line(step: int, steps: int, r: dict[str, float]) -> str:
    """A PPO step's line in the job log."""
    return (
        f"ppo step {step}/{steps}: score {r['score_mean']:.4f} ± {r['score_std']:.4f}, "
        f"KL {r['kl']:.4f} (coef {r['kl_coef']:.4f}), clip {r['clip_frac']:.3f}, "
        f"value loss {r['value_loss']:.4f}, {r['generation_tokens_per_s']:.0f} gen tokens/s"
    )
