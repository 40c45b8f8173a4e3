"""Rejection sampling (Llama 2-Chat's step before PPO): K answers to each prompt sampled from
the policy, each scored by a reward model, the best kept as fine-tuning data.

The prompts are cut into batches of ``sampling.prompts_per_batch``; batch ``i`` is sampled
with seed ``sampling.seed + i``, so the answers do not depend on how many workers share the
batches. Each worker is a Ray task holding the policy and the reward model whole (as
``crucible generate`` does): on GPUs, one device each.

Outputs in the run directory: ``samples.jsonl`` (every prompt with its answers and their
rewards), ``best.jsonl`` (``{"prompt" | "messages", "response"}`` records of the best answers,
the input of the next fine-tuning's data run) and ``summary.json`` (the mean reward of all
answers and of the kept ones, and what was skipped, by reason).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from crucible.cluster.storage import Location, location
from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from crucible.jobs.spec import PPORunSpec, RejectionSamplingRunSpec


def check_inputs(spec: RejectionSamplingRunSpec | PPORunSpec) -> None:
    """Before submitting: the policy is a chat model's checkpoint, the reward one a reward
    model's, and every prompts file exists.

    Raises:
        CrucibleError: the first problem, in one line.
    """
    from crucible.jobs.train import checkpoint as ckpt
    from crucible.jobs.train.export import resolve_checkpoint

    kinds = {}
    for role in ("policy", "reward"):
        path = resolve_checkpoint(getattr(spec, role))
        kinds[role] = ckpt.read_state(path)["spec"].get("kind")
        _chat_template(path)
    if kinds["policy"] not in ("train", "finetune", "ppo"):
        raise CrucibleError(f"policy: {spec.policy} is a {kinds['policy']} run's checkpoint, "
                            "not a language model's (kind: train, finetune or ppo)")  # fmt: skip
    if kinds["reward"] != "reward":
        raise CrucibleError(f"reward: {spec.reward} is not a reward model's checkpoint "
                            f"(kind: {kinds['reward']}, not reward)")  # fmt: skip
    for p in spec.prompts:
        if not location(p).is_file():
            raise CrucibleError(f"prompts: {p} does not exist")


def read_prompts(paths: list[str], skipped: Counter[str]) -> list[dict[str, Any]]:
    """The prompt records of JSONL files: ``prompt`` (optionally ``system``) or ``messages``.
    Other lines are counted in ``skipped`` by reason, never silently dropped.

    Args:
        paths: JSONL files (paths or URIs).
        skipped: counts of lines left out, by reason.
    """
    from crucible.data_pipeline.chat import BadRecord, ChatSpec, record_prompt

    spec = ChatSpec()
    out = []
    for path in paths:
        for line in location(path).read_text().splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                skipped["bad_json"] += 1
                continue
            if not isinstance(obj, dict):
                skipped["bad_json"] += 1
                continue
            try:
                out.append({"record": obj, "turns": record_prompt(obj, spec)})
            except BadRecord as e:
                skipped[e.rule] += 1
    return out


def sample_batch(task: dict[str, Any]) -> dict[str, Any]:
    """One worker's share: sample and score the prompt batches ``task["batches"]``.

    Args:
        task: ``policy``, ``reward`` (checkpoint URIs), ``sampling`` (the spec section as a
            dict), ``batches`` (``[(index, [prompt items])]``), ``device``.

    Returns:
        ``rows`` (per prompt: its record, answers and rewards) and ``skipped`` counts.
    """
    import torch

    from crucible.data_pipeline.chat import TEMPLATES, generation_prompt
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.runs import load_model_spec
    from crucible.jobs.train.export import load_model, resolve_checkpoint
    from crucible.model.generate import generate

    device = torch.device(task["device"])
    s = task["sampling"]
    policy_path = resolve_checkpoint(task["policy"])
    policy = load_model(policy_path).to(device)
    tok, eos = run_tokenizer(load_model_spec(policy_path.parent.parent).data.shards)
    template = TEMPLATES[_chat_template(policy_path)]
    scorer = RewardScorer(task["reward"], device)
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    for index, items in task["batches"]:
        todo = []
        for item in items:
            ids = tok.encode(generation_prompt(item["turns"], template)).ids
            if len(ids) + s["max_new_tokens"] > policy.cfg.max_seq_len:
                skipped["too_long_for_context"] += 1
            else:
                todo.append((item, ids))
        if not todo:
            continue
        k = s["samples_per_prompt"]
        gen = torch.Generator(device=device).manual_seed(s["seed"] + index)
        outs = generate(
            policy, [ids for _, ids in todo for _ in range(k)], s["max_new_tokens"],
            s["temperature"], s["top_k"], s["top_p"], {eos}, generator=gen,
        )  # fmt: skip
        answers = [decode_answer(tok, o, eos, template) for o in outs]
        rewards = scorer.score([(todo[i // k][0]["turns"], a) for i, a in enumerate(answers)])
        for j, (item, _) in enumerate(todo):
            mine = list(
                zip(answers[j * k : (j + 1) * k], rewards[j * k : (j + 1) * k], strict=True)
            )
            rows.append({"index": item["index"], "record": item["record"],
                         "answers": [{"text": a, "reward": r} for a, r in mine]})  # fmt: skip
    return {"rows": rows, "skipped": dict(skipped)}


def decode_answer(tok: Any, ids: list[int], eos: int, template: Any) -> str:
    """The text of a generated answer: its tokens without EOS, up to the template's end
    marker (what a chat model says as its turn)."""
    text: str = tok.decode([t for t in ids if t != eos])
    return text.split(template.end)[0]


class RewardScorer:
    """A reward checkpoint's model and tokenizer: the reward of answers to prompts, each
    rendered as the reward model's shards render a conversation and scored at its EOS.

    Args:
        checkpoint: a reward run's checkpoint (or run directory).
        device: where the model runs.
        batch_size: conversations per forward pass.
        model: the checkpoint's model, already built (e.g. partitioned by ZeRO-3 and wrapped
            by DeepSpeed); None: loaded whole from the checkpoint.
        lockstep: every rank of a partitioned model scores its own pairs at the same time:
            each runs as many forward passes as the rank with the most.
    """

    def __init__(
        self, checkpoint: str, device: Any, batch_size: int = 64, model: Any = None,
        lockstep: bool = False,
    ) -> None:  # fmt: skip
        from crucible.data_pipeline.chat import TEMPLATES
        from crucible.data_pipeline.shards.pack_task import text_specials
        from crucible.jobs.cli.generate import run_tokenizer
        from crucible.jobs.runs import load_model_spec
        from crucible.jobs.train.export import load_model, resolve_checkpoint
        from crucible.model.reward import RewardModel

        path = resolve_checkpoint(checkpoint)
        if model is None:
            model = load_model(path, reward_ok=True)
            if not isinstance(model, RewardModel):
                raise CrucibleError(
                    f"reward: {path} is not a reward model's checkpoint (kind: reward)"
                )
            model = model.to(device)
        self.model = model
        self.context = int(getattr(model, "module", model).cfg.max_seq_len)
        self.lockstep = lockstep
        self.device = device
        self.batch_size = batch_size
        tok, self.eos = run_tokenizer(load_model_spec(path.parent.parent).data.shards)
        self.tok = text_specials(tok)
        self.template = TEMPLATES[_chat_template(path)]

    def score(self, pairs: list[tuple[list[tuple[str, str]], str]]) -> list[float]:
        """Rewards of ``(prompt turns, answer)`` pairs; an answer that cannot be rendered
        (it holds a template marker) or does not fit the context gets -inf: never kept.

        Args:
            pairs: prompt turns and an answer each.
        """
        import torch

        from crucible.data_pipeline.chat import BadRecord, render
        from crucible.data_pipeline.tokens.pack_chat import encode_conversations

        context = self.context
        texts: list[str | None] = []
        for turns, answer in pairs:
            try:
                texts.append(render([*turns, ("assistant", answer)], self.template))
            except BadRecord:
                texts.append(None)
        fine = [t for t in texts if t is not None]
        ids = iter(encode_conversations(self.tok, fine, self.template, self.eos))
        encoded = [next(ids) if t is not None else None for t in texts]
        out = [float("-inf")] * len(pairs)
        todo = [(i, e) for i, e in enumerate(encoded) if e is not None and len(e) <= context]
        passes = -(-len(todo) // self.batch_size)
        # under lockstep the count is agreed before any pass: each pass is a collective
        passes_all = _most_passes(passes, self.device) if self.lockstep else passes
        with torch.no_grad():
            for p in range(passes_all):
                if p >= passes:  # nothing left here: a pass the other ranks need
                    self.model(torch.full((1, 1), self.eos, dtype=torch.long, device=self.device))
                    continue
                chunk = todo[p * self.batch_size : (p + 1) * self.batch_size]
                width = max(len(e) for _, e in chunk)
                tokens = torch.full((len(chunk), width), self.eos, dtype=torch.long)
                for r, (_, e) in enumerate(chunk):
                    tokens[r, : len(e)] = torch.tensor(e)
                # right padding: causal attention keeps each row's last real token unaffected
                rewards, _ = self.model(tokens.to(self.device))
                for r, (i, e) in enumerate(chunk):
                    out[i] = float(rewards[r, len(e) - 1])
        return out


def _most_passes(passes: int, device: Any) -> int:
    """The largest ``passes`` of all ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([passes], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def policy_shards(checkpoint: str) -> str:
    """The shards (tokenizer, chat template) of the run a checkpoint, checkpoints directory or
    run directory belongs to."""
    from crucible.jobs.runs import load_model_spec
    from crucible.jobs.train.export import resolve_checkpoint

    return load_model_spec(resolve_checkpoint(checkpoint).parent.parent).data.shards


def _chat_template(checkpoint: Location) -> str:
    """The chat template of the shards a checkpoint's run trained on (refused if none)."""
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.runs import load_model_spec

    run = checkpoint.parent.parent
    template = read_manifest(load_model_spec(run).data.shards).chat_template
    if template is None:
        raise CrucibleError(
            f"{run} was not trained on chat shards: rejection sampling needs a chat policy "
            "and reward model (a data run with reader.chat)"
        )
    return template


def run_rejection_sampling(run_dir: Location, use_ray: bool = True) -> int:
    """The job: sample, score and keep the best answer to every prompt; write the outputs.

    Args:
        run_dir: the run directory (its resolved spec is a rejection-sampling spec).
        use_ray: spread the batches over Ray tasks (else run them in this process).
    """
    from crucible.jobs.runs import load_run_spec

    spec: RejectionSamplingRunSpec = load_run_spec(run_dir)  # type: ignore[assignment]
    check_inputs(spec)
    t0 = time.perf_counter()
    skipped: Counter[str] = Counter()
    items = read_prompts(spec.prompts, skipped)
    for i, item in enumerate(items):
        item["index"] = i
    if not items:
        raise CrucibleError(f"no prompts in {', '.join(spec.prompts)} (skipped: {dict(skipped)})")
    s = spec.sampling
    per = s.prompts_per_batch
    batches = [(b, items[b * per : (b + 1) * per]) for b in range(-(-len(items) // per))]
    shares = [batches[w :: spec.num_workers] for w in range(spec.num_workers)]
    tasks = [
        {"policy": spec.policy, "reward": spec.reward, "sampling": s.model_dump(),
         "batches": share, "device": "cpu"}
        for share in shares if share
    ]  # fmt: skip
    print(
        f"rejection sampling: {len(items)} prompts x {s.samples_per_prompt} answers, "
        f"{len(batches)} batches on {len(tasks)} worker(s)",
        flush=True,
    )
    results = _on_ray(tasks, spec.use_gpu) if use_ray else [sample_batch(t) for t in tasks]
    rows = sorted((r for res in results for r in res["rows"]), key=lambda r: r["index"])
    for res in results:
        skipped.update(res["skipped"])
    summary = write_outputs(run_dir, rows, skipped, time.perf_counter() - t0)
    print(format_summary(summary), flush=True)
    return 0


def _on_ray(tasks: list[dict[str, Any]], use_gpu: bool | None) -> list[dict[str, Any]]:
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    gpus = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    gpu = bool(gpus) if use_gpu is None else use_gpu
    if gpu and not gpus:
        raise CrucibleError("use_gpu is true but this Ray cluster has no GPUs")
    remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(sample_batch)
    for t in tasks:
        t["device"] = "cuda" if gpu else "cpu"
    return list(ray.get([remote.remote(t) for t in tasks]))


def write_outputs(
    run_dir: Location, rows: list[dict[str, Any]], skipped: Counter[str], seconds: float
) -> dict[str, Any]:
    """``samples.jsonl``, ``best.jsonl`` and ``summary.json`` (written last); the summary.

    Args:
        run_dir: the run directory.
        rows: per prompt, in prompt order: its record and scored answers.
        skipped: prompts and lines left out, by reason.
        seconds: the job's time.
    """
    import math

    best_lines, all_rewards, kept = [], [], []
    for row in rows:
        scored = [a for a in row["answers"] if math.isfinite(a["reward"])]
        all_rewards += [a["reward"] for a in scored]
        if not scored:
            skipped["no_scorable_answer"] += 1
            continue
        best = max(scored, key=lambda a: a["reward"])
        kept.append(best["reward"])
        best_lines.append(json.dumps(sft_record(row["record"], best["text"])) + "\n")
    (run_dir / "samples.jsonl").write_text(
        "".join(json.dumps({"prompt": r["record"], "answers": r["answers"]}) + "\n" for r in rows)
    )
    (run_dir / "best.jsonl").write_text("".join(best_lines))
    summary = {
        "prompts": len(rows),
        "answers": sum(len(r["answers"]) for r in rows),
        "kept": len(kept),
        "mean_reward": sum(all_rewards) / len(all_rewards) if all_rewards else None,
        "kept_mean_reward": sum(kept) / len(kept) if kept else None,
        "skipped": dict(skipped),
        "seconds": seconds,
    }
    (run_dir / "summary.json").write_json(summary)
    return summary


def sft_record(prompt: dict[str, Any], answer: str) -> dict[str, Any]:
    """A fine-tuning record of ``answer`` to ``prompt`` as a data run with ``reader.chat``
    reads it: ``messages`` with the answer as the last turn, or ``prompt`` (and ``system``)
    with ``response``.

    Args:
        prompt: the prompt record (its other fields, such as a reference, are dropped).
        answer: the kept answer.
    """
    if "messages" in prompt:
        return {"messages": [*prompt["messages"], {"role": "assistant", "content": answer}]}
    kept = {k: prompt[k] for k in ("prompt", "system") if k in prompt}
    return kept | {"response": answer}


def format_summary(summary: dict[str, Any]) -> str:
    """The job log's last lines."""

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return (
        f"{summary['prompts']} prompts, {summary['answers']} answers in "
        f"{summary['seconds']:.1f} s; mean reward {f(summary['mean_reward'])}, of the kept "
        f"best {f(summary['kept_mean_reward'])} ({summary['kept']} kept)"
        + (f"; skipped {summary['skipped']}" if summary["skipped"] else "")
    )
