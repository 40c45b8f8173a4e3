"""``kind: reward``: a reward model trained on generated comparisons whose ranking can be
checked (``reverse: w1 w2 w3`` and four answers with 3, 2, 1 and 0 words in their reversed
place, best first), from a base given as a Hugging Face directory, under torchrun (the loop
Ray Train runs). Its held-out accuracy (answer pairs ordered right) rises from 0 (a zeroed
head ties every pair) to at least THRESHOLD, and the exported model scores the held-out
comparisons as the job's last evaluation did.

``kind: rejection-sampling`` as a Ray job on the local cluster: a briefly fine-tuned policy's
answers to held-out prompts, scored by that reward model; the kept best answers have more
words in their reversed place than the answers on average.

``kind: ppo`` as a Ray job on the local cluster: the same policy optimised against that
reward model; its sampled answers to held-out prompts have clearly more words in their
reversed place than the starting policy's, the KL to the reference stays bounded, a resume
from the last-but-one checkpoint with the reference and reward models in a Ray actor of their
own (``frozen.placement: separate``) redoes the last steps bitwise, and `crucible resume` on one
worker goes on from the two workers' last checkpoint (its universal copy)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crucible.cluster.storage import location
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.errors import CrucibleError
from crucible.jobs.finetune.demo_task import reverse_comparisons, write_task
from crucible.jobs.runs import load_run_spec, prepare_run
from crucible.jobs.spec import RewardRunSpec, parse_spec
from crucible.jobs.train.export import load_model
from crucible.model.gpt import build_model, init_weights
from crucible.model.reward import RewardModel, ranking_stats
from crucible.model.spec import resolve_model

pytestmark = [pytest.mark.slow]

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with"]
OFF = {"enabled": False}
STEPS = 300
# Chance orders half of the pairs right. 300 steps reach about 0.8 on this task (measured:
# 0.82); 0.7 leaves room for float differences between CPUs without admitting a model that
# did not learn the ranking.
THRESHOLD = 0.7
# PPO at kl_coef 0.2 kept the KL to the reference (nats per answer) at or below 1.6 at every
# step of the first measured runs (bf16 and fp32, seeds 0 and 1); on an AMD EPYC one step's
# estimate (64 answers) reached 3.03 and fell back the next step, the last 10 steps' mean 1.4.
# The bound is on the mean of the last 10 steps: where the penalty has held the policy.
KL_BOUND = 3.0
KL_STEPS = 10
# Words in place of sampled answers rose from 0.65 to 0.83-0.98 in those runs (+0.18 to
# +0.34); the measurement's standard error is about 0.04, so +0.1 is a clear rise that float
# differences between CPUs leave room for.
PPO_GAIN = 0.1


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reward")


@pytest.fixture(scope="module")
def reward_run(root: Path, standalone: Callable[[str], str]) -> Path:
    records = reverse_comparisons(WORDS, 3000, 3, seed=2)
    (root / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = DataSpec.model_validate(
        {"inputs": [str(root / "comparisons.jsonl")],
         "reader": {"chat": {"template": "plain", "comparisons": True}},
         **{k: OFF for k in ("language", "gopher_repetition", "gopher_quality", "c4",
                             "fineweb", "pii")},
         "dedup": {"minhash": OFF},
         "shards": {"seq_len": 128, "heldout_rows": 64,
                    "tokenizer": {"train": {"vocab_size": 320}}}}
    )  # fmt: skip
    run_pipeline(data, root / "data", executor="local", progress=False)
    shards = root / "data" / "shards"
    base = root / "base"  # a base that knows nothing: the ranking is all the job's
    from crucible.model.hf import to_hf

    to_hf(init_weights(build_model(resolve_model("tiny"), device="cpu"), seed=0)).save_pretrained(
        base
    )
    (base / "tokenizer.json").write_bytes((shards / "tokenizer.json").read_bytes())
    spec = parse_spec({
        "kind": "reward", "name": "rm", "base": {"hf": str(base)},
        "model": {"parallel": {"precision": "fp32"}}, "data": {"shards": str(shards)},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "constant", "weight_decay": 0.0,
                  "global_batch_size": 16, "micro_batch_size": 8},
        "checkpoint": {"every_steps": 150},
        "train": {"num_workers": 2, "max_steps": STEPS, "eval_every": 100, "eval_batches": 4,
                  "spike_window": 0},
        "cluster": {"storage": str(root / "runs")},
    })  # fmt: skip
    assert isinstance(spec, RewardRunSpec)
    run = prepare_run(spec)
    out = standalone(run.uri)
    assert "accuracy" in out  # the job log's evaluation lines
    return run.local_path


@pytest.fixture(scope="module")
def policy_run(root: Path, reward_run: Path, standalone: Callable[[str], str]) -> Path:
    """A policy that has begun to learn the task: 100 steps of full fine-tuning of the same
    random base on prompt/response records, with the reward model's tokenizer (measured: 0.65
    words in place sampled at temperature 1, 1.5 greedy; 200 steps learn the task whole)."""
    train, _ = write_task(root / "task", WORDS, train=3000, heldout=60)
    data = DataSpec.model_validate(
        {"inputs": [str(train)], "reader": {"chat": {"template": "plain"}},
         **{k: OFF for k in ("language", "gopher_repetition", "gopher_quality", "c4",
                             "fineweb", "pii")},
         "dedup": {"minhash": OFF},
         "shards": {"seq_len": 128, "heldout_rows": 8,
                    "tokenizer": {"path": str(root / "data" / "shards" / "tokenizer.json")}}}
    )  # fmt: skip
    run_pipeline(data, root / "sft-data", executor="local", progress=False)
    spec = parse_spec({
        "kind": "finetune", "name": "policy", "base": {"hf": str(root / "base")},
        "model": {"parallel": {"precision": "fp32"}},
        "data": {"shards": str(root / "sft-data" / "shards")},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "constant", "weight_decay": 0.0,
                  "global_batch_size": 8, "micro_batch_size": 4},
        "checkpoint": {"every_steps": 100},
        "train": {"num_workers": 2, "max_steps": 100, "eval_every": 0, "spike_window": 0},
        "cluster": {"storage": str(root / "runs")},
    })  # fmt: skip
    run = prepare_run(spec)
    standalone(run.uri)
    return run.local_path


def test_the_reward_model_learns_the_ranking(reward_run: Path) -> None:
    records = [json.loads(x) for x in (reward_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "heldout_accuracy" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["heldout_accuracy"] >= THRESHOLD, evals
    assert evals[-1]["heldout_loss"] < 0.6 < 0.693  # below chance's log 2
    first_loss = next(r["loss"] for r in records if r.get("step") == 1)
    assert first_loss == pytest.approx(np.log(2), abs=1e-6)  # a zeroed head ties every pair


def test_the_exported_reward_model_scores_as_the_job_did(reward_run: Path) -> None:
    model = load_model(reward_run, reward_ok=True)
    assert isinstance(model, RewardModel)
    records = [json.loads(x) for x in (reward_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "heldout_accuracy" in r][-1]
    spec = load_run_spec(reward_run)
    reader = TrainingReader(spec.data.shards, 16, split="heldout")  # type: ignore[union-attr]
    total = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for b in reader.eval_batches():
            rewards, _ = model(b["input_ids"], doc_ids=b["doc_index"], positions=b["position_ids"])
            total += torch.stack([t.double() for t in ranking_stats(rewards, b["labels"])])
    assert int(total[3]) == 64 * 6  # every held-out comparison's 4·3/2 pairs
    # the same weights, unsharded: the same orderings but for float-reordering near-ties
    assert float(total[2] / total[3]) == pytest.approx(last["heldout_accuracy"], abs=0.02)
    with pytest.raises(CrucibleError, match="is a reward model"):
        load_model(reward_run)  # generate, eval and the hf/gguf exports refuse it


def _in_place(prompt: str, answer: str) -> int:
    """Words of ``answer`` in their reversed place (the task's programmatic score)."""
    right = list(reversed(prompt.removeprefix("reverse: ").split()))
    return sum(a == r for a, r in zip(answer.split(), right, strict=False))


def test_rejection_sampling_keeps_better_answers(
    root: Path, policy_run: Path, reward_run: Path, local_cluster: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from crucible.jobs.submit import submit_run

    monkeypatch.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
    spec = parse_spec({
        "kind": "rejection-sampling", "name": "rs", "cluster": {"storage": str(root / "runs")},
        "policy": str(policy_run), "reward": str(reward_run),
        "prompts": [str(root / "task" / "heldout.jsonl")],
        "sampling": {"samples_per_prompt": 8, "max_new_tokens": 12, "temperature": 1.0},
        "num_workers": 2,
    })  # fmt: skip
    client, job, run = submit_run(spec)
    status = client.wait(job, timeout=900)
    log = client.logs(job)
    assert str(status).endswith("SUCCEEDED"), log[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["prompts"] == 60 and summary["answers"] == 480 and summary["kept"] == 60
    assert summary["kept_mean_reward"] > summary["mean_reward"]
    assert f"{summary['prompts']} prompts, 480 answers" in log  # the job log's summary
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    every = [_in_place(r["prompt"]["prompt"], a["text"]) for r in samples for a in r["answers"]]
    best = [json.loads(x) for x in (run / "best.jsonl").read_text().splitlines()]
    kept = [_in_place(b["prompt"], b["response"]) for b in best]
    assert [b["prompt"] for b in best] == [r["prompt"]["prompt"] for r in samples]
    # measured: 0.71 words in place on average, 1.22 for the kept answers (chance 3/13)
    assert np.mean(kept) >= np.mean(every) + 0.15, (np.mean(kept), np.mean(every))


PPO_STEPS = 40
PPO_CHECKPOINT_EVERY = 36  # checkpoints at 36 and 40: the resume check redoes 4 steps


def _sampled_in_place(run: Path | str, prompts: list[str], per_prompt: int = 8) -> float:
    """Mean words in place of ``per_prompt`` answers to each prompt, sampled at temperature 1
    with a fixed seed from the newest checkpoint of ``run``."""
    from crucible.data_pipeline.chat import TEMPLATES, generation_prompt
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.runs import load_model_spec
    from crucible.model.generate import generate

    shards = load_model_spec(location(run)).data.shards
    tok, eos = run_tokenizer(shards)
    template = TEMPLATES[read_manifest(shards).chat_template]
    ids = [tok.encode(generation_prompt([("user", p)], template)).ids for p in prompts]
    outs = generate(
        load_model(run), [i for i in ids for _ in range(per_prompt)], 12, temperature=1.0,
        stop_tokens={eos}, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    answers = [tok.decode([t for t in o if t != eos]).split(template.end)[0] for o in outs]
    return float(np.mean([_in_place(prompts[i // per_prompt], a) for i, a in enumerate(answers)]))


def test_ppo_raises_the_score_within_the_kl_bound_and_resumes(
    root: Path, policy_run: Path, reward_run: Path, local_cluster: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import shutil

    from crucible.jobs.submit import submit_run
    from crucible.monitoring.report import write_report

    monkeypatch.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
    spec = parse_spec({
        "kind": "ppo", "name": "ppo", "cluster": {"storage": str(root / "runs")},
        "policy": str(policy_run), "reward": str(reward_run),
        "prompts": [str(root / "task" / "train.jsonl")],
        "rollout": {"prompts_per_step": 64, "max_new_tokens": 12},
        "ppo": {"steps": PPO_STEPS, "epochs": 4, "mini_batches": 4, "kl_coef": 0.2},
        "optim": {"actor_lr": 3e-4, "critic_lr": 1e-3},
        "checkpoint": {"every_steps": PPO_CHECKPOINT_EVERY},
        "workers": {"num_workers": 2},
    })  # fmt: skip
    assert spec.model.vocab_size == load_run_spec(policy_run).model.vocab_size  # type: ignore[union-attr]
    started = time.time()
    client, job, run = submit_run(spec)
    status = client.wait(job, timeout=1800)
    log = client.logs(job)
    assert str(status).endswith("SUCCEEDED"), log[-5000:]
    assert f"ppo step {PPO_STEPS}/{PPO_STEPS}" in log and "PPO ran in" in log
    assert "reference and reward model partitioned by ZeRO-3" in log
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "ppo"]
    assert [r["step"] for r in steps] == list(range(1, PPO_STEPS + 1))

    # The programmatic score (words in their reversed place) of answers sampled from the
    # trained policy against the starting one's, on held-out prompts.
    heldout = [json.loads(x)["prompt"] for x in (root / "task" / "heldout.jsonl").read_text().splitlines()]  # fmt: skip
    before, after = _sampled_in_place(policy_run, heldout), _sampled_in_place(run, heldout)
    assert after >= before + PPO_GAIN, (before, after)
    # the reward model's score rose over the run, and the policy stayed near the reference
    first = np.mean([r["score_mean"] for r in steps[:5]])
    last = np.mean([r["score_mean"] for r in steps[-5:]])
    assert last > first, (first, last)
    assert np.mean([r["kl"] for r in steps[-KL_STEPS:]]) < KL_BOUND, [r["kl"] for r in steps]
    assert any(f.name == "ppo.png" for f in write_report(run))
    # the GPU-hours ledger holds the attempt: every step productive (the run finished on a
    # committed checkpoint), its saves and start-up billed to their phases
    from crucible.monitoring.ledger import account

    spent = account(run)
    assert spent.finished and spent.attempts == 1 and spent.devices == 2, spent
    assert spent.seconds["productive"] > 0 and spent.seconds["lost"] == 0, spent.seconds
    assert spent.seconds["checkpoint"] > 0 and spent.seconds["startup"] > 0, spent.seconds
    # The cluster's Prometheus found both ranks (job="ppo") and rank 0's run-wide series, the
    # last step's included, and the ledger's device-seconds; every panel of the PPO dashboard
    # shows data over the run's time span.
    from drill import RANGE_STEP_S, prometheus_query, prometheus_range

    from crucible.monitoring.dashboards import ppo as ppo_dashboard
    from crucible.monitoring.dashboards import resolve

    def seen(expr: str) -> dict[str, float]:
        found = prometheus_query(local_cluster.prometheus_url, f"max_over_time({expr}[1h])", time.time())  # fmt: skip
        return {s["metric"].get("rank", ""): float(s["value"][1]) for s in found}

    assert seen('crucible_ppo_step{run="ppo", job="ppo"}') == {"0": PPO_STEPS}
    generation = seen('crucible_ppo_phase_seconds_total{run="ppo", phase="generation"}')
    assert set(generation) == {"0", "1"} and min(generation.values()) > 0, generation
    tokens = seen('crucible_ppo_generated_tokens_total{run="ppo"}')
    assert tokens == {"0": sum(r["generated_tokens"] for r in steps)}, tokens
    assert max(seen('crucible_gpu_seconds_total{run="ppo", phase="productive"}').values()) > 0

    def shown(expr: str) -> bool:
        expr = resolve(expr, "ppo", scrape_interval_s=5, step_s=RANGE_STEP_S)
        return bool(prometheus_range(local_cluster.prometheus_url, expr, started, time.time()))

    panels = ppo_dashboard()["panels"]
    empty = [(p["title"], t["expr"]) for p in panels for t in p["targets"] if not shown(t["expr"])]
    assert not empty, empty

    # A resume after losing the last checkpoint redoes its steps bitwise. (Not across
    # placements: a partitioned model's forward runs on gathered parameters at other
    # addresses, and on some CPUs, AMD EPYC here, the kernels then sum in another order.)
    import os
    import subprocess
    import sys

    def resume_cli(*sets: str) -> str:
        args = [a for kv in sets for a in ("--set", kv)]
        cli = subprocess.run(
            [sys.executable, "-m", "crucible", "resume", run.uri, *args],
            capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        out = cli.stdout + cli.stderr
        assert cli.returncode == 0, out[-5000:]
        return out

    shutil.rmtree((run / "checkpoints" / f"step-{PPO_STEPS}").local_path)
    out = resume_cli()
    assert "reference and reward model partitioned by ZeRO-3" in out, out[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resume = next(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert records[resume]["step"] == PPO_CHECKPOINT_EVERY
    redone = {r["step"]: r for r in records[resume:] if r["kind"] == "ppo"}
    assert sorted(redone) == list(range(PPO_CHECKPOINT_EVERY + 1, PPO_STEPS + 1))
    timing = {"time", "generation_seconds", "generation_tokens_per_s", "score_seconds", "train_seconds",
              "train_tokens_per_s"}  # fmt: skip
    for step, r in redone.items():
        was = steps[step - 1]
        assert {k: v for k, v in r.items() if k not in timing} == {
            k: v for k, v in was.items() if k not in timing
        }, step

    # On one worker, with the reference and reward models moved to a Ray actor of their own
    # (on the CPU the worker leaves): the driver converts step-40's actor and critic to a
    # universal copy, the worker loads it and trains two more steps.
    out = resume_cli(
        "workers.num_workers=1", f"ppo.steps={PPO_STEPS + 2}", "frozen.placement=separate"
    )
    assert f"converted step-{PPO_STEPS} (2 ranks) to a universal checkpoint for 1 ranks" in out
    assert "reference and reward models in 1 actor(s) of their own" in out, out[-3000:]
    universal = run / "checkpoints" / "universal" / f"step-{PPO_STEPS}"
    assert {"ds", "critic"} <= set(universal.ls()), universal.ls()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(i for i, r in enumerate(records) if r["kind"] == "resume")
    assert (
        records[last]["step"],
        records[last]["world_size"],
        records[last]["saved_world_size"],
    ) == (PPO_STEPS, 1, 2)
    more = {r["step"]: r for r in records[last:] if r["kind"] == "ppo"}
    assert sorted(more) == [PPO_STEPS + 1, PPO_STEPS + 2]
    changes = [json.loads(x)["changes"] for x in (run / "spec_history.jsonl").read_text().splitlines()]  # fmt: skip
    assert changes == [{
        "workers.num_workers": [2, 1], "ppo.steps": [PPO_STEPS, PPO_STEPS + 2],
        "frozen.placement": ["colocated", "separate"],
    }]  # fmt: skip
    # the trained actor was loaded, not the starting weights, whose KL to the reference (the
    # same weights) is zero, as step 1's is
    late_kl = float(np.mean([r["kl"] for r in steps[-KL_STEPS:]]))
    assert abs(steps[0]["kl"]) < 0.1 * late_kl, (steps[0]["kl"], late_kl)
    assert np.mean([r["kl"] for r in more.values()]) > 0.1 * late_kl, (more, late_kl)


def test_ppo_refuses_what_it_cannot_run(root: Path, policy_run: Path, reward_run: Path) -> None:
    from crucible.jobs.preflight import preflight

    def spec(**over: Any) -> Any:
        return parse_spec({
            "kind": "ppo", "name": "bad", "cluster": {"storage": str(root / "runs")},
            "policy": str(policy_run), "reward": str(reward_run),
            "prompts": [str(root / "task" / "heldout.jsonl")], **over,
        })  # fmt: skip

    for over, error in [
        ({"rollout": {"prompts_per_step": 30}, "ppo": {"mini_batches": 4},
          "workers": {"num_workers": 2}}, "must be a multiple of workers.num_workers x ppo.mini"),
        ({"reward": str(policy_run)}, "is not a reward model's checkpoint"),
        ({"policy": str(reward_run)}, "not a language model's"),
        ({"prompts": [str(root / "nope.jsonl")]}, "does not exist"),
    ]:  # fmt: skip
        with pytest.raises(CrucibleError, match=error) as e:
            preflight(spec(**over))
        assert "\n" not in str(e.value)
    with pytest.raises(Exception, match="kl_cof"):
        spec(ppo={"kl_cof": 0.1})  # a typo is an error, not a default
    resolved = spec()
    assert resolved.model.resolve() == load_run_spec(policy_run).model.resolve()  # type: ignore[union-attr]
    assert resolved.data.shards == load_run_spec(policy_run).data.shards  # type: ignore[union-attr]
