"""BERT pre-training end to end on the CPU: WordPiece shards of the demo corpus, the tiny
BERT trained with masked-LM and next-sentence prediction under ZeRO-3 on 2 ranks, its
held-out masked-token accuracy well above the unigram baseline, a bitwise resume, and the
export that transformers' ``BertForPreTraining`` loads with crucible's logits."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crucible.cluster.storage import Location
from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.sample import WORDS
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.errors import CrucibleError
from crucible.jobs.runs import prepare_run
from crucible.jobs.spec import TrainRunSpec, parse_spec
from crucible.jobs.train.export import consolidate, export_checkpoint, load_model

STEPS = 800  # a tiny BERT leaves the unigram plateau after 450-650 steps on this data
EVERY = 100
EVALS = 2  # held-out global batches per evaluation


def grammar_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Demo-corpus sentences (its English word list, 8 to 20 words and a full stop) whose
    words follow a fixed random grammar, each word having two possible successors: a masked
    word is then predictable from its neighbours. (The demo corpus proper draws every word
    independently: beyond the pieces of a split word nothing in it can be predicted from
    context, see the note of this change.)"""
    rng = random.Random(seed)
    words = WORDS["en"]
    successors = {w: rng.sample(words, 2) for w in words}
    texts = []
    for _ in range(n_docs):
        word, sentences, sentence = rng.choice(words), [], []
        for _ in range(rng.choice([40, 120, 300])):
            sentence.append(word)
            word = rng.choice(successors[word])
            if len(sentence) >= rng.randint(8, 20):
                sentences.append(" ".join(sentence).capitalize() + ".")
                sentence = []
        texts.append(" ".join(sentences))
    return texts


@pytest.fixture(scope="module")
def bert_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WordPiece shards (vocab 512, rows of 33 tokens) of 300 grammar documents."""
    root = tmp_path_factory.mktemp("bert-data")
    docs = root / "documents"
    docs.mkdir()
    texts = grammar_texts(300)
    ids = [f"doc{i}" for i in range(len(texts))]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate({
        "seq_len": 32, "rows_per_shard": 1000, "heldout_fraction": 0.05,
        "tokenizer": {"train": {"model": "wordpiece", "vocab_size": 512}},
    })  # fmt: skip
    build_shards(docs, spec, root / "shards", LocalExecutor(), "bert-tests")
    return root / "shards"


def _spec(storage: Path, shards: Path, **objective: Any) -> TrainRunSpec:
    spec = parse_spec({
        "kind": "train", "name": "bert", "cluster": {"storage": str(storage)},
        "model": {"preset": "bert-tiny"},
        "data": {"shards": str(shards)},
        "objective": {"kind": "mlm", **objective},
        "optim": {"global_batch_size": 32, "micro_batch_size": 16, "warmup_steps": 20,
                  "lr": 3e-3, "weight_decay": 0.01, "schedule": "constant"},
        "checkpoint": {"every_steps": EVERY, "keep_last": 2},
        "train": {"num_workers": 2, "max_steps": STEPS, "eval_every": EVERY,
                  "eval_batches": EVALS, "log_every": 50},
    })  # fmt: skip
    assert isinstance(spec, TrainRunSpec)
    return spec


def _records(run: Location, kind: str) -> list[dict[str, Any]]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == kind]


def hidden_accuracy(model: Any, shards: Path, objective: Any) -> tuple[float, float]:
    """``(model, unigram baseline)`` accuracy on the held-out tokens replaced by [MASK] (the
    ones the model cannot see), over the batches the run evaluates: the baseline always
    answers the commonest of them."""
    reader = TrainingReader(shards, 32, split="heldout", doc_index=False, mlm=objective)
    mask = reader.masking.special["mask"]  # type: ignore[union-attr]
    right, targets = 0, []
    with torch.no_grad():
        for batch in list(reader.eval_batches())[:EVALS]:
            labels = batch["labels"]
            logits, _ = model(batch["input_ids"], labels, doc_ids=batch["doc_index"],
                              token_types=batch["token_type_ids"])  # fmt: skip
            hidden = batch["input_ids"][labels != -100] == mask
            target = labels[labels != -100]
            right += int((logits.argmax(-1) == target)[hidden].sum())
            targets += target[hidden].tolist()
    return right / len(targets), Counter(targets).most_common(1)[0][1] / len(targets)


@pytest.mark.slow
def test_bert_learns_masked_tokens_resumes_bitwise_and_exports(
    bert_shards: Path, tmp_path: Path, standalone: Callable[[str], str]
) -> None:
    from transformers import BertForPreTraining

    spec = _spec(tmp_path, bert_shards)
    run = prepare_run(spec)
    log = standalone(run.uri)
    steps = _records(run, "step")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), log[-2000:]
    curve = [(r["step"], round(r["heldout_accuracy"], 3)) for r in steps if "heldout_accuracy" in r]
    assert [s for s, _ in curve] == list(range(EVERY, STEPS + 1, EVERY))
    model = load_model(run, encoder_ok=True)
    accuracy, baseline = hidden_accuracy(model, bert_shards, spec.objective)
    print(f"\nheld-out masked-token accuracy {curve}; on [MASK] positions {accuracy:.3f}, "
          f"unigram baseline {baseline:.3f}")  # fmt: skip
    assert accuracy >= 3 * baseline, (accuracy, baseline, curve)
    assert curve[-1][1] > curve[0][1] + 0.2, curve

    # Set the last checkpoint aside: the resumed run retrains its steps bit for bit.
    checkpoints = run / "checkpoints"
    first, _ = consolidate(checkpoints / f"step-{STEPS}")
    (checkpoints / f"step-{STEPS}").rmtree()
    prepare_run(spec, resume=True)
    standalone(run.uri)
    again = _records(run, "step")[len(steps) :]
    assert [r["step"] for r in again] == list(range(STEPS - EVERY + 1, STEPS + 1))
    assert [r["loss"] for r in again] == [r["loss"] for r in steps[STEPS - EVERY :]]
    second, _ = consolidate(checkpoints / f"step-{STEPS}")
    assert all(torch.equal(first[k], second[k]) for k in first)

    # The Hugging Face export: BertForPreTraining gives crucible's logits.
    out = export_checkpoint(run, "hf", tmp_path / "hf")
    hf = BertForPreTraining.from_pretrained(out).eval()
    tokens = torch.randint(5, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(tokens)
    types[:, 16:] = 1
    with torch.no_grad():
        theirs = hf(input_ids=tokens, token_type_ids=types)
        mlm, nsp = model.predict(tokens, types)  # type: ignore[operator]
    assert (theirs.prediction_logits - mlm).abs().max() <= 1e-4
    assert (theirs.seq_relationship_logits - nsp).abs().max() <= 1e-4
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(CrucibleError, match="does not generate"):
        load_model(run)


def test_masked_batches_are_the_same_at_any_world_size_and_after_a_resume(
    bert_shards: Path,
) -> None:
    """The masked-LM reader keeps the reader's contract: rank slices of world size 2 make
    world size 1's global batch, a reader restored from another's state continues with its
    batches, and a second epoch masks the same samples anew."""
    objective = _spec(bert_shards, bert_shards, nsp=True, whole_word=True).objective
    one = TrainingReader(bert_shards, 8, doc_index=False, mlm=objective)
    two = [TrainingReader(bert_shards, 8, rank=r, world_size=2, doc_index=False, mlm=objective)
           for r in range(2)]  # fmt: skip
    for _ in range(3):
        whole, parts = one.next_batch(), [r.next_batch() for r in two]
        assert set(whole) == {"input_ids", "labels", "token_type_ids", "doc_index",
                              "next_sentence_label", "sample_index"}  # fmt: skip
        for key, value in whole.items():
            assert torch.equal(value, torch.cat([p[key] for p in parts])), key
    restored = TrainingReader(bert_shards, 8, doc_index=False, mlm=objective)
    restored.load_state_dict(one.state_dict())
    nxt, again = one.next_batch(), restored.next_batch()
    assert all(torch.equal(nxt[k], again[k]) for k in nxt)
    assert set(nxt["next_sentence_label"].tolist()) <= {0, 1}

    # a sample read in another epoch is masked differently
    first = one.stream_indices(0, 1)
    epoch0 = one.to_tensors(first, epochs=np.zeros(1, np.int64))
    epoch1 = one.to_tensors(first, epochs=np.ones(1, np.int64))
    assert not torch.equal(epoch0["labels"], epoch1["labels"])


def test_bert_specs_that_cannot_run_are_refused(train_shards: Path, tmp_path: Path) -> None:
    from crucible.jobs.preflight import preflight

    base = {"kind": "train", "name": "b", "cluster": {"storage": str(tmp_path)},
            "model": {"preset": "bert-tiny"}, "data": {"shards": str(train_shards)},
            "objective": {"kind": "mlm"}, "train": {"max_steps": 2}}  # fmt: skip
    # GPT-2-style BPE shards have no [CLS], [SEP] or [MASK]
    with pytest.raises(CrucibleError, match="tokenizer.train.model: wordpiece") as e:
        preflight(parse_spec(base))
    assert "\n" not in str(e.value)
    for over, error in [
        ({"objective": {"kind": "clm"}}, "model arch bert trains with objective.kind mlm"),
        ({"model": {"preset": "tiny"}}, "model arch gpt trains with objective.kind clm"),
        ({"objective": {"kind": "clm", "nsp": True}}, "options of kind: mlm"),
        ({"data": {"shards": "x", "mask_cross_document": True}}, "for decoders"),
        ({"train": {"max_steps": 2, "eval_prompts": "p.jsonl"}}, "generating model"),
    ]:
        with pytest.raises(CrucibleError, match=error):
            parse_spec(base | over)
