"""Reward-model data: comparison records (a prompt and ranked answers, or chosen/rejected)
through the pipeline into shards where each comparison is one row's whole group, each
answer a document of its own, and the targets are the answers' ranks at their last token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crucible.data_pipeline.chat import (
    TEMPLATES,
    BadRecord,
    ChatSpec,
    record_comparison,
    render,
    render_comparison,
    split_comparison,
)
from crucible.data_pipeline.pipeline import run_pipeline
from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.errors import CrucibleError

OFF = {"enabled": False}
NO_FILTERS = {k: OFF for k in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")}
SPEC = ChatSpec(comparisons=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_comparison_renders_as_whole_conversations_best_first(name: str) -> None:
    t = TEMPLATES[name]
    prompt, answers = record_comparison({"prompt": "pick", "answers": ["good", "ok", "bad"]}, SPEC)
    assert prompt == [("user", "pick")]
    text = render_comparison(prompt, answers, t)
    convs = split_comparison(text, t)
    assert convs == [render([("user", "pick"), ("assistant", a)], t) for a in answers]
    assert split_comparison(text.rstrip(), t)[-1] == convs[-1].rstrip()  # as normalised
    pair = record_comparison({"prompt": "pick", "chosen": "good", "rejected": "bad"}, SPEC)
    assert pair == (prompt, ["good", "bad"])
    chat = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "pick"}], "answers": ["a", "b"]}  # fmt: skip
    assert record_comparison(chat, SPEC)[0] == [("system", "be brief"), ("user", "pick")]


@pytest.mark.parametrize(
    ("record", "rule"),
    [
        ({"prompt": "p", "answers": ["only one"]}, "bad_comparison"),
        ({"prompt": "p", "answers": ["same", "same"]}, "bad_comparison"),
        ({"prompt": "p", "answers": ["a", 3]}, "bad_comparison"),
        ({"prompt": "p", "chosen": "a"}, "bad_comparison"),
        ({"prompt": "p"}, "bad_comparison"),
        ({"answers": ["a", "b"]}, "bad_chat"),
    ],
)
def test_bad_comparisons_are_named(record: dict, rule: str) -> None:
    with pytest.raises(BadRecord) as e:
        record_comparison(record, SPEC)
    assert e.value.rule == rule


def test_comparison_shards_hold_ranked_answers(tmp_path: Path, train_shards: Path) -> None:
    inp = tmp_path / "comparisons.jsonl"
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was"]
    good = [{"prompt": f"say {w}", "answers": [w, f"{w} {w}", "no"]} for w in words]
    pair = {"prompt": "say with", "chosen": "with", "rejected": "without"}
    lines = [json.dumps(r) for r in [*good, pair, {"prompt": "x", "answers": ["one"]}]]
    inp.write_text("\n".join([*lines, "not json"]) + "\n")
    spec = DataSpec.model_validate(
        {"inputs": [str(inp)], "reader": {"chat": {"template": "plain", "comparisons": True}},
         **NO_FILTERS, "pii": OFF, "dedup": {"minhash": OFF},
         "shards": {"seq_len": 128, "heldout_rows": 2, "rows_per_shard": 4,
                    "tokenizer": {"path": str(train_shards / "tokenizer.json")}}}
    )  # fmt: skip
    stats = run_pipeline(spec, tmp_path / "run", executor="local", progress=False)
    assert stats["steps"]["read"]["dropped"] == {"bad_comparison": 1, "bad_json": 1}
    shards = tmp_path / "run" / "shards"
    m = read_manifest(shards)
    assert m.comparisons and m.chat_template == "plain"
    assert m.totals.documents == 13 and m.totals.target_tokens == 12 * 3 + 2  # answers
    tok = load_tokenizer(shards / "tokenizer.json")
    eos = m.tokenizer.eos_id
    groups = []
    for split in ("train", "heldout"):
        r = TrainingReader(shards, 1, split=split, doc_index=False)
        for i in range(r.num_samples):
            b = r.to_tensors(np.array([i]))
            ids, labels = b["input_ids"][0].numpy(), b["labels"][0].numpy()
            doc, pos = b["doc_index"][0].numpy(), b["position_ids"][0].numpy()
            scored = np.flatnonzero(labels != -100)
            assert (ids[scored] == eos).all()  # each answer is scored at its EOS
            ranks = labels[scored].tolist()
            # whole groups, best first: 1..K, then the next group's 1..K
            starts = [k for k, v in enumerate(ranks) if v == 1]
            for a, b_ in zip(starts, [*starts[1:], len(ranks)], strict=True):
                assert ranks[a:b_] == list(range(1, b_ - a + 1))
                answers = []
                for s in scored[a:b_]:
                    at = np.flatnonzero(doc == doc[s])  # the answer's own document
                    assert pos[at].tolist() == list(range(len(at)))
                    answers.append(tok.decode(ids[at].tolist()).split("assistant:")[-1].strip())
                groups.append(answers)
    assert sorted(groups) == sorted([g["answers"] for g in good] + [["with", "without"]])


def test_a_reward_run_needs_comparison_shards(tmp_path: Path, train_shards: Path) -> None:
    from crucible.jobs.spec import parse_spec
    from crucible.jobs.train.run import check_shards

    spec = parse_spec({
        "kind": "train", "name": "t", "cluster": {"storage": str(tmp_path)},
        "model": {"preset": "tiny"}, "data": {"shards": str(train_shards)},
        "train": {"num_workers": 1, "max_steps": 1},
    })  # fmt: skip
    check_shards(spec)  # type: ignore[arg-type]
    data = spec.model_dump(mode="json") | {"kind": "reward", "base": {"hf": str(tmp_path)}}
    data["data"]["mask_cross_document"] = True
    reward = parse_spec(data)
    with pytest.raises(CrucibleError, match="kind: reward needs comparison shards"):
        check_shards(reward)  # type: ignore[arg-type]
