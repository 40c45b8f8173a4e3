"""``crucible eval`` (jobs/evaluation.py, jobs/cli/evaluate.py) on a committed checkpoint:
perplexity equal to a hand computation over the held-out split, exact match against known
answers, bad prompt lines counted, the report written, user errors in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.data_pipeline.training_reader import TrainingReader
from crucible.model.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_perplexity_and_exact_match(tiny_checkpoint, train_shards: Path, tmp_path: Path, cli):
    run_dir, model = tiny_checkpoint
    info = read_manifest(train_shards).tokenizer
    tok = load_tokenizer(train_shards / info.file)
    prompts = ["the cat of", "and to in a", "is that for it", "as was with"]
    ids = [tok.encode(p).ids for p in prompts]
    answers = [tok.decode([t for t in n if t != info.eos_id])
               for n in generate(model, ids, 5, stop_tokens={info.eos_id})]  # fmt: skip
    lines = [
        json.dumps({"prompt": p, "reference": a})
        for p, a in zip(prompts[:3], answers[:3], strict=True)
    ]
    lines += [json.dumps({"prompt": prompts[3], "answer": answers[3] + " not it"})]  # wrong
    lines += ["{not json", json.dumps(["a list"]), json.dumps({"prompt": "no reference"}),
              json.dumps({"prompt": "the " * 200, "reference": "x"})]  # fmt: skip
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")

    rc, out, err = cli(["eval", str(run_dir), "--prompts", str(tmp_path / "p.jsonl"),
                              "--max-new-tokens", "5", "--batch-size", "3"])  # fmt: skip
    assert rc == 0, err

    # by hand: every held-out row once, token-weighted (the run attends across documents)
    reader = TrainingReader(train_shards, 4, split="heldout")
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for b in reader.eval_batches():
            logits, _ = model(b["input_ids"])
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                              ignore_index=-100, reduction="sum"))  # fmt: skip
            n += int((b["labels"] != -100).sum())
    report = json.loads((run_dir / "eval" / "step-3" / "eval.json").read_text())
    ppl = report["perplexity"]
    assert ppl["tokens"] == n > 0
    assert ppl["loss"] == pytest.approx(loss_sum / n, rel=1e-5)
    assert ppl["perplexity"] == pytest.approx(math.exp(loss_sum / n), rel=1e-5)
    acc = report["prompts"]
    assert acc["evaluated"] == 4 and acc["exact_match"] == 0.75
    assert acc["skipped"] == {"bad_json": 1, "not_an_object": 1, "missing_prompt_or_reference": 1,
                              "too_long_for_context": 1}  # fmt: skip
    assert "exact match 75.0% of 4 prompts" in out
    assert f"perplexity {math.exp(loss_sum / n):.2f}" in out
    md = (run_dir / "eval" / "step-3" / "eval.md").read_text()
    assert "| the cat of |" in md and "| no |" in md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "/nope/p.jsonl"], "prompts file /nope/p.jsonl does not exist"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--split", "dev"], "--split is heldout or train"),
        (["--empty"], "no usable record"),
        (["--missing"], "is not a checkpoint"),
    ],
)
def test_user_errors_are_one_line_exit_2(tiny_checkpoint, tmp_path, args, message, cli):
    run_dir, _ = tiny_checkpoint
    if "--empty" in args:
        (tmp_path / "e.jsonl").write_text("{bad\n")
        args = ["--prompts", str(tmp_path / "e.jsonl")]
    where = str(run_dir / "nowhere") if "--missing" in args else str(run_dir)
    args = [a for a in args if a != "--missing"]
    rc, out, err = cli(["eval", where, *args])
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err
