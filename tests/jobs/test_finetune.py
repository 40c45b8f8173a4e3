"""``kind: finetune``: a tiny GPT pretrained on text in which word triples are followed by
their reverse (``the of and = and of the``), given as a Hugging Face directory, fine-tuned on
an instruction task in a chat template it has never seen ("reverse: w1 w2 w3" → "w3 w2 w1"):
fully under torchrun and with LoRA as a Ray job on the local cluster. Exact match on
held-out prompts rises from 0 to at least THRESHOLD both ways; the loss is taken on the
answers only (the masks are checked in tests/data_pipeline/test_chat.py).

The base has the skill and not the format, as a pretrained model meeting an instruction
template does: LoRA, which leaves the base frozen, teaches the format and reuses the skill
(from a base pretrained on random words alone it does not learn the reversal within
hundreds of steps, since its frozen embeddings and positions never took part in one)."""

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
STEPS = 300
# Chance is 1/13^3 per prompt; the base, never shown the template, scores 0. In-process runs
# on this task and base (lr 3e-3 full, 1e-2 LoRA): full fine-tuning reaches 0.70-1.0 by
# step 200 and 1.0 by 300; LoRA 0.78-1.0 at step 300 over 7 base/adapter seeds. 0.5 leaves
# room for float differences between CPUs without admitting a model that did not learn.
THRESHOLD = 0.5
LORA_STEPS = 300
# The base's pretraining: reversal lines among a few documents of random words, until it
# reverses BASE_SKILL of fresh triples in that format (in-process: by step 2,000-2,250).
BASE_SKILL = 0.9
BASE_MAX_STEPS = 6000
OFF = {"enabled": False}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, train_shards: Path) -> dict[str, Path]:
    """Chat shards of 3,000 generated training conversations (about 1,650 left after exact
    dedup: 13 words make 2,197 prompts), held-out prompts, and the base model: the
    tiny preset pretrained until it reverses triples in its own format, saved as a Hugging
    Face directory."""
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
            "base": _pretrained_base(root, tok), "root": root}  # fmt: skip


def _pretraining_shards(root: Path, tokenizer: Path) -> Path:
    """20 documents of random words and 1,500 of 2-8 reversal lines (``a b c = c b a``)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from crucible.data_pipeline.executors.local import LocalExecutor
    from crucible.data_pipeline.shards.build import build_shards
    from crucible.data_pipeline.shards.spec import ShardSpec

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 40, 200, 900])))
             for _ in range(20)]  # fmt: skip
    for _ in range(1500):
        lines = []
        for _ in range(rng.randint(2, 8)):
            w = [rng.choice(WORDS) for _ in range(3)]
            lines.append(f"{' '.join(w)} = {' '.join(reversed(w))}")
        texts.append("\n".join(lines))
    docs = root / "pretraining"
    docs.mkdir()
    ids = [f"d{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate({"seq_len": 64, "rows_per_shard": 2000,
                                     "heldout_fraction": 0.05,
                                     "tokenizer": {"path": str(tokenizer)}})  # fmt: skip
    build_shards(docs, spec, root / "pretraining-shards", LocalExecutor(), "reversal-text")
    return root / "pretraining-shards"


def _reverses(model: Any, tokenizer: Path, n: int = 40) -> float:
    """The share of fresh triples ``a b c =`` the model completes greedily with ``c b a``."""
    import random

    from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
    from crucible.model.generate import generate

    tok = load_tokenizer(tokenizer)
    rng = random.Random(9)
    triples = [[rng.choice(WORDS) for _ in range(3)] for _ in range(n)]
    prompts = [tok.encode(f"{' '.join(w)} =").ids for w in triples]
    outs = generate(model, prompts, 6, 0.0, None, 1.0, set())
    said = [tok.decode(o).split("\n")[0].split() for o in outs]
    return sum(s[:3] == w[::-1] for s, w in zip(said, triples, strict=True)) / n


def _pretrained_base(root: Path, tokenizer: Path) -> Path:
    """The tiny preset pretrained (AdamW as the jobs configure it) until it reverses
    BASE_SKILL of fresh triples in its pretraining format; a Hugging Face directory."""
    from crucible.data_pipeline.training_reader import TrainingReader
    from crucible.model.hf import to_hf

    shards = _pretraining_shards(root, tokenizer)
    torch.manual_seed(0)
    model = init_weights(build_model(resolve_model("tiny"), device="cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    reader = TrainingReader(shards, 16)
    skill = 0.0
    for step in range(1, BASE_MAX_STEPS + 1):
        b = reader.next_batch()
        _, loss = model(b["input_ids"], b["labels"])
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, step / 20)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 and (skill := _reverses(model, tokenizer)) >= BASE_SKILL:
            break
    assert skill >= BASE_SKILL, f"the base reverses {skill:.2f} of triples after {step} steps"
    print(f"base: reverses {skill:.2f} of fresh triples after {step} steps")
    out = root / "base"
    to_hf(model).save_pretrained(out)
    (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
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
        "checkpoint": {"every_steps": STEPS // 2},
        "train": {"num_workers": 2, "max_steps": STEPS, "eval_every": STEPS // 2, "eval_batches": 1,
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
    print(f"full fine-tuning exact match after {STEPS} steps: {em:.2f}")
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
    """LoRA as a Ray job: exact match rises to THRESHOLD, the base stays bit-for-bit frozen,
    the checkpoint is smaller than full fine-tuning's, and a resume after losing the last
    checkpoint redoes its steps bit for bit (same world size, CPU): the base is loaded again,
    then the checkpoint (adapters, optimizer, RNG, data position) over it.

    The adapters sit on the attention, MLP and output projections (``lm_head``: the tied
    table's rows of the template's characters were never trained, and the answer must end
    with its end marker)."""
    from safetensors.torch import load_file

    from crucible.jobs.submit import submit_run
    from crucible.jobs.train.export import consolidate

    lora = {"rank": 16, "alpha": 32, "target_modules": ["qkv", "proj", "fc", "lm_head"]}
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
    em = _exact_match(load_model(run_dir), task)
    print(f"LoRA exact match after {LORA_STEPS} steps: {em:.2f}")
    assert em >= THRESHOLD, em
    # The checkpoint holds the adapters alone: the frozen base is <run>/base, loaded before
    # every resume; the merged model's untouched weights are the base's, bit for bit.
    step = ckpt.latest_committed(location(run_dir / "checkpoints"))
    assert step is not None
    sd, _ = consolidate(step[0])
    assert sd and all("lora_" in k for k in sd), sorted(k for k in sd if "lora_" not in k)[:5]
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in sd.items())  # adapters learned
    base = load_file(str(run_dir / "base" / "model.safetensors"))
    merged = load_model(run_dir).state_dict()
    for k in ("tok_emb.weight", "pos_emb.weight", "norm_f.weight", "blocks.0.norm1.weight"):
        assert torch.equal(merged[k], base[k]), k
    lora_bytes = sum(f.stat().st_size for f in step[0].local_path.rglob("*") if f.is_file())
    full = full_run / "checkpoints" / f"step-{STEPS}"
    full_bytes = sum(f.stat().st_size for f in full.rglob("*") if f.is_file())
    print(f"checkpoint bytes: LoRA {lora_bytes:,}, full {full_bytes:,}")
    assert lora_bytes < full_bytes / 2

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


@pytest.mark.parametrize("head", [False, True], ids=["blocks", "blocks+tied-head"])
def test_merged_lora_gives_the_adapter_models_logits(head: bool) -> None:
    """With an adapter on the head of a model whose head and embeddings share one table,
    the merge leaves the embeddings as they were and unties the head."""
    from crucible.jobs.finetune.lora import apply_lora, merge_lora, trainable_share
    from crucible.jobs.finetune.spec import LoraSpec

    cfg = resolve_model("tiny")
    assert cfg.tie_embeddings
    targets = ["qkv", "proj", "fc"] + (["lm_head"] if head else [])
    spec = LoraSpec(rank=4, alpha=8, target_modules=targets)
    base = init_weights(build_model(cfg, device="cpu"), seed=1)
    table = base.tok_emb.weight.detach().clone()
    model = apply_lora(base, spec, seed=2)
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
    assert torch.equal(merged.tok_emb.weight, table)
    assert merged.cfg.tie_embeddings is not head
    assert (merged.lm_head.weight is merged.tok_emb.weight) is not head


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
