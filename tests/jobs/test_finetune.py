"""``kind: finetune``: a briefly pretrained tiny GPT, given as a Hugging Face directory,
fine-tuned on a generated instruction task ("reverse: w1 w2 w3" → "w3 w2 w1") with a
checkable answer: fully under torchrun and with LoRA as a Ray job on the local cluster. Exact
match on held-out prompts rises from 0 to at least THRESHOLD; the loss is taken on the
answers only (the masks are checked in tests/data_pipeline/test_chat.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from crucible.cluster.storage import location
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.spec import DataSpec
from crucible.jobs.finetune.demo_task import write_task
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import FinetuneRunSpec, parse_spec
from crucible.jobs.train import checkpoint as ckpt
from crucible.jobs.train.export import load_model
from crucible.model.gpt import build_model, init_weights
from crucible.model.spec import resolve_model

pytestmark = [pytest.mark.slow]

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with"]
STEPS = 500
# Chance is 1/13^3 per prompt; the base, never shown the template, scores 0. 500 steps of
# full fine-tuning reach 0.65-1.0 here; 0.5 leaves room for float differences between CPUs
# without admitting a model that did not learn the task.
THRESHOLD = 0.5
# LoRA's loss reaches its plateau on this base by about step 40 (see its test).
LORA_STEPS = 100
OFF = {"enabled": False}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, train_shards: Path) -> dict[str, Path]:
    """Chat shards of 3,000 generated training conversations (about 1,650 left after exact
    dedup: 13 words make 2,197 prompts), held-out prompts, and the base model: the
    tiny preset pretrained 150 steps on the test shards, saved as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("finetune")
    train_file, heldout = write_task(root / "task", WORDS, train=3000, heldout=60)
    tok = train_shards / "tokenizer.json"
    spec = DataSpec.model_validate(
        {"inputs": [str(train_file)], "reader": {"chat": {"template": "plain"}},
         **{k: OFF for k in ("language", "gopher_repetition", "gopher_quality", "c4",
                             "fineweb", "pii")},
         "dedup": {"minhash": OFF},
         "shards": {"seq_len": 128, "heldout_rows": 8, "tokenizer": {"path": str(tok)}}}
    )  # fmt: skip
    run_pipeline(spec, root / "data", executor="local", progress=False)
    return {"shards": root / "data" / "shards", "heldout": heldout,
            "base": _pretrained_base(root / "base", train_shards), "root": root}  # fmt: skip


def _pretrained_base(out: Path, shards: Path) -> Path:
    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.model.hf import to_hf

    torch.manual_seed(0)
    model = init_weights(build_model(resolve_model("tiny"), device="cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    reader = TrainingReader(shards, 16)
    for _ in range(150):
        b = reader.next_batch()
        _, loss = model(b["input_ids"], b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    to_hf(model).save_pretrained(out)
    (out / "tokenizer.json").write_bytes((shards / "tokenizer.json").read_bytes())
    return out


def _spec(name: str, storage: Path, task: dict[str, Path], **extra: Any) -> FinetuneRunSpec:
    data = {
        "kind": "finetune",
        "name": name,
        "base": {"hf": str(task["base"])},
        "model": {"parallel": {"precision": "fp32"}},
        "data": {"shards": str(task["shards"])},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "constant", "weight_decay": 0.0,
                  "global_batch_size": 8, "micro_batch_size": 4},
        "checkpoint": {"every_steps": 250},
        "train": {"num_workers": 2, "max_steps": STEPS, "eval_every": 250, "eval_batches": 1,
                  "spike_window": 0},  # small batches: noisy losses, not spikes
        "cluster": {"storage": str(storage)},
    } | extra  # fmt: skip
    spec = parse_spec(data)
    assert isinstance(spec, FinetuneRunSpec)
    return spec


def _exact_match(model: Any, task: dict[str, Path]) -> float:
    from crucible.data_pipeline.chat import TEMPLATES
    from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
    from crucible.jobs.evaluation import prompt_accuracy, read_prompts

    tok = load_tokenizer(task["shards"] / "tokenizer.json")
    eos = tok.token_to_id("<|endoftext|>")
    prompts = read_prompts(location(task["heldout"]))
    acc = prompt_accuracy(model, tok, eos, prompts, 12, 16, template=TEMPLATES["plain"])
    assert acc["evaluated"] == 60
    return float(acc["exact_match"])


@pytest.fixture(scope="module")
def full_run(task: dict[str, Path], standalone: Callable[[str], str]) -> Iterator[Path]:
    """Full fine-tuning, 2 ranks under torchrun (the same loop as on Ray Train), with the
    held-out prompts' exact match at each evaluation."""
    spec = _spec("sft-full", task["root"] / "runs", task)
    spec.train.eval_prompts = str(task["heldout"])
    spec.train.eval_max_new_tokens = 12
    run = prepare_run(spec)
    standalone(run.uri)
    yield run.local_path


def test_the_base_does_not_know_the_task(task: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from crucible.model.hf import from_hf

    base = from_hf(AutoModelForCausalLM.from_pretrained(task["base"], dtype=torch.float32))
    assert _exact_match(base, task) == 0.0


def test_full_finetune_learns_the_task(full_run: Path, task: dict[str, Path]) -> None:
    info = json.loads((full_run / "base" / "info.json").read_text())
    assert info["base"] == {"checkpoint": None, "hf": str(task["base"])}
    em = _exact_match(load_model(full_run), task)
    assert em >= THRESHOLD, em
    evals = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["heldout_loss"] for r in evals if "heldout_loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0]
    # the job's own exact match (every rank decoding in lockstep under ZeRO-3) is the
    # exported model's, but for greedy near-ties between sharded and whole weights
    in_job = [r["heldout_exact_match"] for r in evals if "heldout_exact_match" in r]
    assert len(in_job) == 2 and in_job[-1] == pytest.approx(em, abs=0.05), (in_job, em)


def test_finetune_refuses_another_shape_or_tokenizer(
    task: dict[str, Path], tmp_path: Path, train_shards: Path
) -> None:
    from crucible.errors import CrucibleError
    from crucible.jobs.finetune.base import check_base

    spec = _spec("x", tmp_path, task)
    with pytest.raises(CrucibleError, match="tokenized with another tokenizer"):
        check_base(spec, "0" * 64)
    data = spec.model_dump(mode="json")
    data["model"]["n_layers"] = 3
    with pytest.raises(CrucibleError, match="model.n_layers is 3 but the base model's is 2"):
        check_base(parse_spec(data), "")  # type: ignore[arg-type]


def test_checkpoint_base_converts_to_the_same_weights(
    tiny_checkpoint: tuple[Path, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from crucible.jobs.finetune.base import INFO, WEIGHTS, convert_base

    run_dir, model = tiny_checkpoint
    out = convert_base({"checkpoint": str(run_dir)}, str(tmp_path / "base"))
    sd = load_file(str(Path(out) / WEIGHTS))
    want = model.state_dict()
    assert set(sd) == set(want) - {"lm_head.weight"}  # tied: stored once
    for k, v in sd.items():
        assert torch.equal(v, want[k]), k
    info = json.loads((Path(out) / INFO).read_text())
    assert info["parameters"] == sum(v.numel() for v in sd.values())


@pytest.fixture(scope="module")
def cluster_storage(local_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """CRUCIBLE_HOME pointing at the session cluster for this module; the storage root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRUCIBLE_HOME", str(Path(local_cluster.state_dir).parent))
        yield tmp_path_factory.mktemp("finetune-runs")


def test_lora_finetune_on_the_cluster(
    cluster_storage: Path, task: dict[str, Path], full_run: Path
) -> None:
    """LoRA as a Ray job: the loss falls, the base stays bit-for-bit frozen, the adapters
    learn, the checkpoint is smaller than full fine-tuning's, and a resume after losing the
    last checkpoint redoes its steps bit for bit (same world size, CPU): the base is loaded
    again, then the checkpoint (adapters, optimizer, RNG, data position) over it.

    (On this base LoRA does not learn the task: the embeddings of the template's characters,
    unseen in pretraining, and the learned positions stay frozen, and full fine-tuning with
    those frozen stalls too. Its exact match is printed, not held to THRESHOLD.)"""
    from safetensors.torch import load_file

    from crucible.jobs.submit import submit_run
    from crucible.jobs.train.export import consolidate

    lora = {"rank": 16, "alpha": 32, "target_modules": ["qkv", "proj", "fc"]}
    data = _spec("sft-lora", cluster_storage, task, lora=lora).model_dump(mode="json")
    data["optim"]["lr"] = 1e-2  # adapters start at zero and take a larger step
    data["train"]["max_steps"] = LORA_STEPS
    data["checkpoint"]["every_steps"] = LORA_STEPS - 10  # the resume below redoes 10 steps
    data["train"]["eval_every"] = LORA_STEPS // 2
    spec = parse_spec(data)
    client, job_id, run = submit_run(spec)  # type: ignore[arg-type]
    log = "".join(client.follow(job_id))
    assert str(client.status(job_id)).endswith("SUCCEEDED"), log[-5000:]
    run_dir = run.local_path

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "step"]
    # The loss falls from the base's (10.7 at step 1: the template's characters are new to
    # it) to a plateau, 4.4 from about step 40 (the last 50 steps' mean 0.41 of step 1's).
    # Against the first 50 steps' mean the ratio depends on how fast it falls, which varies
    # between CPUs (0.77 on an AMD EPYC, where an earlier bound of 0.75 failed).
    assert sum(losses[-50:]) / 50 < 0.6 * losses[0], (losses[0], losses[-50:])
    print(
        f"LoRA exact match after {LORA_STEPS} steps: {_exact_match(load_model(run_dir), task):.2f}"
    )
    # the base stayed frozen: every base weight in the checkpoint is the base's
    step = ckpt.latest_committed(location(run_dir / "checkpoints"))
    assert step is not None
    sd, _ = consolidate(step[0])
    base = load_file(str(run_dir / "base" / "model.safetensors"))
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
              for k, v in sd.items() if "lora_" not in k}  # fmt: skip
    assert set(base) <= set(frozen)
    for k, v in base.items():
        assert torch.equal(frozen[k], v), k
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in sd.items())  # adapters learned
    lora_bytes = sum(f.stat().st_size for f in step[0].local_path.rglob("*") if f.is_file())
    full = full_run / "checkpoints" / "step-500"
    full_bytes = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    print(f"checkpoint bytes: LoRA {lora_bytes:,}, full {full_bytes:,}")
    assert lora_bytes < full_bytes

    shutil.rmtree(run_dir / "checkpoints" / f"step-{LORA_STEPS}")
    client, job_id, run = submit_run(spec, resume=True)  # type: ignore[arg-type]
    log = "".join(client.follow(job_id))
    assert str(client.status(job_id)).endswith("SUCCEEDED"), log[-5000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [r for r in records if r.get("kind") == "step"][LORA_STEPS:]
    assert [r["step"] for r in again] == list(range(LORA_STEPS - 9, LORA_STEPS + 1))
    assert [r["loss"] for r in again] == losses[-10:]
    step = ckpt.latest_committed(location(run_dir / "checkpoints"))
    assert step is not None and step[0].name == f"step-{LORA_STEPS}"
    resumed, _ = consolidate(step[0])
    assert sd.keys() == resumed.keys() and all(torch.equal(sd[k], resumed[k]) for k in sd)


def test_merged_lora_gives_the_adapter_models_logits() -> None:
    from crucible.jobs.finetune.lora import apply_lora, merge_lora, trainable_share
    from crucible.jobs.finetune.spec import LoraSpec

    cfg = resolve_model("tiny")
    spec = LoraSpec(rank=4, alpha=8, target_modules=["qkv", "proj", "fc"])
    model = apply_lora(init_weights(build_model(cfg, device="cpu"), seed=1), spec, seed=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    trainable, total = trainable_share(model)
    assert 0 < trainable < 0.2 * total
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want, _ = model.eval()(x)
        merged = merge_lora(model.state_dict(), cfg, spec)
        got, _ = merged(x)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float reordering only


def test_generate_answers_in_the_chat_template(full_run: Path, cli: Any) -> None:
    rc, out, err = cli(["generate", str(full_run), "--prompt", "reverse: the of and",
                        "--temperature", "0", "--max-new-tokens", "16"])  # fmt: skip
    assert rc == 0, err
    answer = out.strip().splitlines()[-1].split()
    assert len(answer) == 3 and set(answer) <= set(WORDS), out  # the answer's format, alone


def test_hf_base_from_object_storage(s3: Any, task: dict[str, Path], tmp_path: Path) -> None:
    """A base in a bucket: its shape read through the storage layer, its weights fetched
    file by file and converted, the same as from the local directory."""
    from safetensors.torch import load_file

    from crucible.jobs.finetune.base import WEIGHTS, base_config, convert_base
    from crucible.jobs.finetune.spec import BaseSpec

    remote = location(s3.bucket("bases") + "/tiny")
    for f in task["base"].iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    local_base = BaseSpec(hf=str(task["base"]))
    assert base_config(BaseSpec(hf=remote.uri)) == base_config(local_base)
    convert_base({"hf": remote.uri}, str(tmp_path / "a"))
    convert_base({"hf": str(task["base"])}, str(tmp_path / "b"))
    a, b = load_file(str(tmp_path / "a" / WEIGHTS)), load_file(str(tmp_path / "b" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
