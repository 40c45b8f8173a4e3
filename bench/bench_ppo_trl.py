"""PPO steps/s: crucible's ``kind: ppo`` worker loop against Hugging Face TRL's PPOTrainer.

Both sides run in this one script run, on the same tiny models and task, one process each,
on the CPU in fp32: the RLHF tests' chat policy (a 2-layer GPT fine-tuned 100 steps to reverse three
words), the reward model ``rm`` (that trunk plus a scalar ``score`` head, which also starts
the value model) and the "reverse: w1 w2 w3" prompts. A PPO step is 64 prompts, one answer
each (at most 12 new tokens, temperature 1), 4 epochs x 4 mini-batches of 16 rows, KL
coefficient 0.2, clip 0.2, value clip 0.2, gamma 1, lambda 0.95, advantages whitened, AdamW
with the actor at 3e-4 and the critic at 1e-3.

- crucible: a PPO spec (1 worker, ZeRO 0, fp32) launched with ``torchrun --nproc-per-node=1``
  on ``ppo_loop_per_worker`` (as Ray would, without Ray). Seconds per step: the median, over
  steps after the first, of ``generation_seconds + train_seconds`` from ``metrics.jsonl``
  (which leaves out reward scoring and decoding) and of the interval between consecutive
  step records (the whole step); plus the wall time of the whole torchrun.
- TRL: ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12.0, the last release with PPO) in its own
  fresh process, on Hugging Face copies of the same weights saved once beforehand (policy and
  reference via ``crucible.model.hf.to_hf``; reward and value models as
  ``GPT2ForSequenceClassification`` with the reward model's trunk and ``score``, checked to
  give crucible's logits and rewards to 1e-4). Seconds per step: the median, over steps after
  the first, of the interval between ``on_step_end`` callbacks; ``train()``'s wall time
  divided by the steps also reported. Model set-up is not timed. TRL's generation time and
  its per-step ``gc.collect()`` time are measured by wrapping them.

Rounds alternate which side runs first (other jobs share the machine); each figure is the
median over rounds. Needs ``pip install --no-deps trl==1.12.0``. Run from the repo root:

    .venv/bin/python bench/bench_ppo_trl.py [--root DIR] [--steps 8] [--rounds 2] [--threads 1]

Prints a table and writes ``bench/results/ppo_trl_cpu_2026-12-01.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The runs tests/jobs/test_rlhf.py builds (its 100-step policy and the reward model); keep
# them with ``pytest tests/jobs/test_rlhf.py -k rejection --basetemp=/tmp/ppodev``.
ROOT = "/tmp/ppodev/reward0"
POLICY, REWARD = f"{ROOT}/runs/policy", f"{ROOT}/runs/rm"
PROMPTS = f"{ROOT}/task/train.jsonl"


def set_root(root: str) -> None:
    """Read the policy, reward model and prompts under ``root``."""
    global ROOT, POLICY, REWARD, PROMPTS
    ROOT = root
    POLICY, REWARD = f"{ROOT}/runs/policy", f"{ROOT}/runs/rm"
    PROMPTS = f"{ROOT}/task/train.jsonl"


OUT = Path(__file__).parent / "results" / "ppo_trl_cpu_2026-12-01.json"
S = dict(prompts_per_step=64, max_new_tokens=12, temperature=1.0, epochs=4, mini_batches=4,
         kl_coef=0.2, clip=0.2, value_clip=0.2, gamma=1.0, lam=0.95, actor_lr=3e-4,
         critic_lr=1e-3, adam_betas=(0.9, 0.95), whiten_advantages=True, seed=0)  # fmt: skip


def crucible_side(steps: int, threads: int, storage: str) -> dict:
    """Launch crucible's PPO worker loop under torchrun (1 rank) and read its metrics."""
    from crucible.cluster.storage import read_jsonl
    from crucible.jobs.rlhf.ppo import check_ppo, convert_weights
    from crucible.jobs.runs import prepare_run
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.export import resolve_checkpoint

    spec = parse_spec({
        "kind": "ppo", "name": "bench-ppo-trl", "cluster": {"storage": storage},
        "policy": POLICY, "reward": REWARD, "prompts": [PROMPTS],
        "model": {"parallel": {"zero_stage": 0, "precision": "fp32"}},
        "rollout": {"prompts_per_step": S["prompts_per_step"],
                    "max_new_tokens": S["max_new_tokens"], "temperature": S["temperature"]},
        "ppo": {"steps": steps, "epochs": S["epochs"], "mini_batches": S["mini_batches"],
                "kl_coef": S["kl_coef"], "clip_range": S["clip"],
                "value_clip_range": S["value_clip"], "gamma": S["gamma"], "lam": S["lam"],
                "whiten_advantages": True, "normalize_rewards": False},
        "optim": {"actor_lr": S["actor_lr"], "critic_lr": S["critic_lr"]},
        "checkpoint": {"every_steps": steps},  # saved once, after the last step's record
        "workers": {"num_workers": 1, "cpus_per_worker": threads, "seed": S["seed"]},
    })  # fmt: skip
    check_ppo(spec)
    run = prepare_run(spec)
    for name, src, reward in (("policy", spec.policy, False), ("critic", spec.reward, True)):
        convert_weights(resolve_checkpoint(src).uri, (run / "init" / name).uri, reward)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           __file__, "--worker", run.uri]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"crucible's torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "ppo"]
    assert len(recs) == steps, f"{len(recs)} step records, expected {steps}"
    gen_train = [r["generation_seconds"] + r["train_seconds"] for r in recs[1:]]
    interval = [b["time"] - a["time"] for a, b in itertools.pairwise(recs)]
    return {"seconds_per_step": statistics.median(gen_train),
            "seconds_per_step_full": statistics.median(interval),
            "generation_seconds": statistics.median(r["generation_seconds"] for r in recs[1:]),
            "torchrun_wall_seconds": wall, "score_first": recs[0]["score_mean"],
            "score_last": recs[-1]["score_mean"], "run": run.uri}  # fmt: skip


def export_hf(out: str) -> dict:
    """Write TRL's inputs from crucible's runs under ``out``: the policy (``to_hf``), the reward
    model as a ``GPT2ForSequenceClassification`` (the value model starts from it too), the
    tokenizer and the encoded prompts; check the reloaded models against crucible's."""
    import torch
    from transformers import (
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )
    from trl.experimental.utils import get_reward

    from crucible.cluster.storage import location
    from crucible.data_pipeline.chat import TEMPLATES, generation_prompt, render
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.rlhf.rejection import read_prompts
    from crucible.jobs.runs import load_model_spec
    from crucible.jobs.train.export import load_model
    from crucible.model.hf import hf_config, state_dict_to_hf, to_hf

    shards = load_model_spec(location(POLICY)).data.shards
    manifest = read_manifest(shards)
    tok, eos = run_tokenizer(shards)
    template = TEMPLATES[manifest.chat_template]
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(location(shards) / manifest.tokenizer.file))
    hf_tok.eos_token = hf_tok.pad_token = tok.id_to_token(eos)
    hf_tok.padding_side = "left"  # TRL's queries are left-padded
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eos
    hf_tok.save_pretrained(f"{out}/tokenizer")

    gpt, rm = load_model(POLICY), load_model(REWARD, reward_ok=True)
    to_hf(gpt).save_pretrained(f"{out}/policy")
    cfg = hf_config(rm.cfg)
    cfg.num_labels, cfg.pad_token_id = 1, eos
    seq = GPT2ForSequenceClassification(cfg)
    sd = {k: v for k, v in state_dict_to_hf(rm.state_dict(), rm.cfg).items()
          if k.startswith("transformer.")}  # fmt: skip
    seq.load_state_dict(sd | {"score.weight": rm.score.weight.detach().clone()}, strict=True)
    seq.save_pretrained(f"{out}/reward")
    items = read_prompts([PROMPTS], Counter())
    prompts = [tok.encode(generation_prompt(it["turns"], template)).ids for it in items]
    Path(f"{out}/prompts.json").write_text(json.dumps(prompts))

    # checks on the saved copies: policy logits; rewards at the answers' EOS (crucible's
    # scoring position) and where TRL's get_reward reads them (last non-pad token)
    policy = GPT2LMHeadModel.from_pretrained(f"{out}/policy").eval()
    reward_model = GPT2ForSequenceClassification.from_pretrained(f"{out}/reward").eval()
    texts = [render([*it["turns"], ("assistant", it["record"]["response"])], template)
             for it in items[:6]]  # fmt: skip
    rows = [[*tok.encode(t).ids, eos] for t in texts]
    batch = torch.full((len(rows), max(map(len, rows))), eos)
    for i, r in enumerate(rows):
        batch[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        logit_err = (policy(batch).logits - gpt(batch)[0]).abs().max().item()
        ours = rm(batch)[0]
        eos_err = 0.0
        for i, r in enumerate(rows):  # one unpadded row at a time: its last token is the EOS
            ids = torch.tensor([r])
            h = reward_model.transformer(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            diff = reward_model.score(h)[0, -1, 0] - ours[i, len(r) - 1]
            eos_err = max(eos_err, diff.abs().item())
        _, theirs, at = get_reward(reward_model, batch, eos, min(map(len, prompts)) - 1)
        trl_err = (theirs - ours[torch.arange(len(rows)), at]).abs().max().item()
    assert max(logit_err, eos_err, trl_err) < 1e-4, (logit_err, eos_err, trl_err)
    return {"policy_logits_max_abs_diff": logit_err, "reward_at_eos_max_abs_diff": eos_err,
            "reward_via_trl_get_reward_max_abs_diff": trl_err}  # fmt: skip


def trl_side(steps: int, threads: int, storage: str, hf_dir: str) -> dict:
    """Run TRL's PPO in a fresh process (as crucible's side runs in its own torchrun)."""
    out = f"{storage}/trl.json"
    cmd = [sys.executable, __file__, "--trl-worker", hf_dir, str(steps), str(threads), out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"TRL's process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(out).read_text()) | {"process_wall_seconds": wall}


def trl_worker(hf_dir: str, steps: int, threads: int, out: str) -> None:
    """Train TRL's PPO for ``steps`` steps on the exported models; write the timings to
    ``out``. Seconds per step: intervals between step-end callbacks."""
    import gc

    import torch
    from datasets import Dataset
    from transformers import (
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(threads)
    torch.manual_seed(S["seed"])
    tok = PreTrainedTokenizerFast.from_pretrained(f"{hf_dir}/tokenizer", padding_side="left")
    policy, ref = (GPT2LMHeadModel.from_pretrained(f"{hf_dir}/policy") for _ in range(2))
    reward_model, value_model = (
        GPT2ForSequenceClassification.from_pretrained(f"{hf_dir}/reward") for _ in range(2)
    )
    prompts = json.loads(Path(f"{hf_dir}/prompts.json").read_text())
    n = S["prompts_per_step"]
    args = PPOConfig(
        output_dir=str(Path(out).parent / "trl"), report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, seed=S["seed"], total_episodes=steps * n,
        per_device_train_batch_size=n, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=n, num_mini_batches=S["mini_batches"],
        num_ppo_epochs=S["epochs"], response_length=S["max_new_tokens"],
        temperature=S["temperature"], stop_token="eos", kl_coef=S["kl_coef"],
        kl_estimator="k1", cliprange=S["clip"], cliprange_value=S["value_clip"], vf_coef=1.0,
        gamma=S["gamma"], lam=S["lam"], whiten_rewards=False, num_sample_generations=0,
        learning_rate=S["actor_lr"], lr_scheduler_type="constant", weight_decay=0.0,
        adam_beta1=S["adam_betas"][0], adam_beta2=S["adam_betas"][1], adam_epsilon=1e-8,
    )  # fmt: skip
    # one AdamW, two groups: the policy at the actor's rate and the value model at the critic's
    optimizer = torch.optim.AdamW(
        [{"params": list(policy.parameters()), "lr": S["actor_lr"]},
         {"params": list(value_model.parameters()), "lr": S["critic_lr"]}],
        betas=S["adam_betas"], eps=1e-8, weight_decay=0.0,
    )  # fmt: skip
    marks: list[float] = []
    spent = {"generation": [], "gc": []}  # TRL's rollout generation and its gc.collect() calls

    def timed(kind: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            result = fn(*a, **k)
            spent[kind].append(time.perf_counter() - t)
            return result

        return wrapper

    class StepClock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
        value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": prompts}),
        optimizers=(optimizer, None), callbacks=[StepClock()],
    )  # fmt: skip
    trl_ppo.batch_generation = timed("generation", trl_ppo.batch_generation)
    trl_ppo.gc = type("TimedGC", (), {"collect": staticmethod(timed("gc", gc.collect))})
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    assert len(marks) == steps, f"{len(marks)} TRL steps, expected {steps}"
    scores = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    per_step = statistics.median(b - a for a, b in itertools.pairwise(marks))
    gc_per_step = sum(spent["gc"][2:]) / (steps - 1)  # two calls a step; the first step's left out
    Path(out).write_text(json.dumps({
        "seconds_per_step": per_step, "gc_collect_seconds_per_step": gc_per_step,
        "seconds_per_step_without_gc_collect": per_step - gc_per_step,
        "generation_seconds": statistics.median(spent["generation"][1:]),
        "train_wall_seconds": wall, "train_wall_seconds_per_step": wall / steps,
        "score_first": scores[0], "score_last": scores[-1],
    }))  # fmt: skip


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":  # a torchrun rank of crucible's side
        from crucible.jobs.rlhf.ppo_worker import ppo_loop_per_worker

        ppo_loop_per_worker({"run_dir": sys.argv[2], "use_gpu": False})
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--trl-worker":  # TRL's side, its own process
        hf_dir, steps, threads, out = sys.argv[2:6]
        trl_worker(hf_dir, int(steps), int(threads), out)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="PPO steps per side and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per side")
    p.add_argument("--storage", default=f"/tmp/bench_ppo_trl/{int(time.time())}")
    p.add_argument("--root", default=ROOT, help="the RLHF tests' runs (DIR/reward0 of --basetemp)")
    a = p.parse_args()
    set_root(a.root)
    hf_dir = f"{a.storage}/hf"
    checks = export_hf(hf_dir)
    print(f"HF copies in {hf_dir}, checked against crucible's: {checks}", flush=True)
    res: dict[str, list[dict]] = {"crucible": [], "trl": []}
    for r in range(a.rounds):
        storage = f"{a.storage}/round{r}"
        Path(storage).mkdir(parents=True, exist_ok=True)
        for side in ("crucible", "trl") if r % 2 == 0 else ("trl", "crucible"):
            if side == "crucible":
                res[side].append(crucible_side(a.steps, a.threads, storage))
            else:
                res[side].append(trl_side(a.steps, a.threads, storage, hf_dir))
            print(f"round {r} {side}: {res[side][-1]['seconds_per_step']:.3f} s/step", flush=True)

    def med(side: str, key: str) -> float:
        return statistics.median(x[key] for x in res[side])

    c, c_full = med("crucible", "seconds_per_step"), med("crucible", "seconds_per_step_full")
    t, t_gc = med("trl", "seconds_per_step"), med("trl", "gc_collect_seconds_per_step")
    c_gen, t_gen = med("crucible", "generation_seconds"), med("trl", "generation_seconds")
    t_nogc = med("trl", "seconds_per_step_without_gc_collect")
    result = {
        "benchmark": "PPO steps/s, crucible kind: ppo vs TRL PPOTrainer (CPU, fp32, 1 process each)",
        "crucible": {"seconds_per_step": c, "steps_per_s": 1 / c,
                     "seconds_per_step_full": c_full, "steps_per_s_full": 1 / c_full,
                     "generation_seconds_per_step": c_gen,
                     "torchrun_wall_seconds": med("crucible", "torchrun_wall_seconds"),
                     "rounds": res["crucible"]},
        "trl": {"seconds_per_step": t, "steps_per_s": 1 / t,
                "train_wall_seconds_per_step": med("trl", "train_wall_seconds_per_step"),
                "generation_seconds_per_step": t_gen, "gc_collect_seconds_per_step": t_gc,
                "seconds_per_step_without_gc_collect": t_nogc,
                "process_wall_seconds": med("trl", "process_wall_seconds"),
                "class": "trl.experimental.ppo.PPOTrainer", "rounds": res["trl"]},
        "model_checks": checks,
        "speedup_crucible_over_trl": t / c,  # steps/s crucible / steps/s TRL; > 1: crucible faster
        "speedup_crucible_over_trl_full_step": t / c_full,
        "speedup_crucible_over_trl_without_trl_gc_collect": t_nogc / c_full,
        "versions": {k: version(k) for k in ("torch", "transformers", "trl", "deepspeed")},
        "settings": {**S, "steps": a.steps, "rounds": a.rounds, "threads": a.threads,
                     "policy": POLICY, "reward": REWARD, "prompts": PROMPTS},
        "notes": NOTES,
    }  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{'':28}{'s/step':>9}{'steps/s':>9}{'gen s':>9}")
    print(f"{'crucible (gen + train)':28}{c:9.3f}{1 / c:9.2f}{c_gen:9.3f}")
    print(f"{'crucible (whole step)':28}{c_full:9.3f}{1 / c_full:9.2f}{c_gen:9.3f}")
    print(f"{'TRL ' + version('trl') + ' PPOTrainer':28}{t:9.3f}{1 / t:9.2f}{t_gen:9.3f}")
    print(f"{'TRL less its gc.collect()':28}{t_nogc:9.3f}{1 / t_nogc:9.2f}{t_gen:9.3f}")
    print(
        f"speed-up crucible/TRL in steps/s: {t / c:.2f}x (gen + train), {t / c_full:.2f}x "
        f"(whole step), {t_nogc / c_full:.2f}x (whole step vs TRL less its gc.collect())"
    )
    print(f"settings: {a.steps} steps x {a.rounds} rounds, {a.threads} thread(s) per side; "
          f"{json.dumps(S)}\nwritten: {OUT}")  # fmt: skip


NOTES = [
    "TRL's PPO is trl.experimental.ppo.PPOTrainer/PPOConfig up to TRL 1.12.0 (removed in "
    "1.13.0): pinned trl==1.12.0, installed with --no-deps.",
    "Learning rates matched: TRL takes one optimizer for its policy+value wrapper, so it gets "
    "an AdamW with two groups (policy 3e-4, value 1e-3; betas 0.9/0.95, eps 1e-8, no weight "
    "decay, constant) and vf_coef=1.0: one backward of pg_loss + vf_loss and one step per "
    "mini-batch, where crucible runs two DeepSpeed engines, each with its own backward and step.",
    "Not matched: crucible clips both models' gradients to norm 1.0; TRL's PPO never clips.",
    "Whitening: advantages on both sides (TRL always). TRL's whiten_rewards and crucible's "
    "ppo.normalize_rewards (running score normalisation, no TRL counterpart) are off.",
    "Old log-probs: TRL takes them from generate()'s scores; crucible runs one more actor "
    "forward. Both run reference, value and reward forwards every step.",
    "Generation: TRL uses transformers generate() (KV cache, response_length=12, stop at eos, "
    "left-padded queries) then pads after the EOS; crucible's batched generate() stops rows "
    "at EOS.",
    "Reward: TRL scores the generated token sequence at the last token before the first pad; "
    "pad = eos here, so at the token before EOS (EOS also masked out of attention). crucible "
    "decodes the answer, re-renders it with the reward model's chat template and scores at "
    "EOS. The converted models give crucible's logits and rewards to 1e-4 (model_checks).",
    "TRL calls gc.collect() twice every step (trl.gc_collect_seconds_per_step; about 0.2 s a "
    "call here, as it walks every Python object torch/transformers/datasets/trl imported, "
    "which is why TRL runs in a fresh process without crucible or DeepSpeed), plus "
    "empty_cache(), metric gathers and a log call; sample generations are off and nothing is "
    "saved.",
    "crucible's generation_seconds + train_seconds leaves out reward scoring (decode, render, "
    "reward forward) and the metrics write; seconds_per_step_full (the interval between step "
    "records in metrics.jsonl) is the whole step, like TRL's figure. Medians skip step 1.",
    "crucible's torchrun_wall_seconds includes start-up, imports, model and DeepSpeed set-up "
    "and a checkpoint save after the last step; TRL's set-up is not timed.",
    "Threads: crucible's worker sets torch threads to workers.cpus_per_worker (and "
    "deterministic algorithms on); TRL's process sets the same torch.set_num_threads.",
]


if __name__ == "__main__":
    main()
