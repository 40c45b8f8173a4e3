"""Evaluating a checkpoint on this machine: perplexity over a shard split, and exact match of
greedy completions against references from a JSONL file of prompts (``crucible eval``).

A prompts file holds one JSON object per line with ``prompt`` and ``reference`` (or
``answer``) strings. Lines that are not such objects, and prompts that do not fit the context
with the completion, are counted and skipped, never silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from crucible.cluster.storage import Location
from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from crucible.data_pipeline.chat import Template
    from crucible.model.gpt import GPT


@torch.no_grad()
def perplexity(
    model: GPT, shards: str, split: str, batch_size: int, max_batches: int | None, doc_mask: bool
) -> dict[str, float]:
    """Token-weighted loss and perplexity of ``model`` over a split of ``shards``, in storage
    order (every sample once; the first ``max_batches`` batches when given).

    Args:
        model: the model, on the device to evaluate on.
        shards: the shard set (path or URI).
        split: ``heldout`` or ``train``.
        batch_size: rows per forward pass.
        max_batches: evaluate only this many batches (None: the whole split).
        doc_mask: attend within documents only (as the run trained).
    """
    from crucible.data_pipeline.training_reader import TrainingReader

    reader = TrainingReader(shards, batch_size, split=split, doc_index=doc_mask)
    if reader.num_samples == 0:
        raise CrucibleError(f"split {split!r} of {shards} has no rows; evaluate another split")
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in islice(reader.eval_batches(), max_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, _ = model(
            batch["input_ids"], doc_ids=batch.get("doc_index"), positions=batch.get("position_ids")
        )
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="sum")  # fmt: skip
        loss_sum += float(loss)
        tokens += int((labels != -100).sum())
    model.train(was_training)
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": float(tokens)}


@dataclass
class PromptSet:
    """The usable records of a prompts file, and what was skipped and why."""

    records: list[dict[str, str]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def read_prompts(path: Location) -> PromptSet:
    """The ``prompt``/``reference`` records of a JSONL file; bad lines counted by reason.

    Args:
        path: the file.

    Raises:
        CrucibleError: the file is missing or holds no usable record.
    """
    if not path.is_file():
        raise CrucibleError(f"prompts file {path} does not exist")
    out = PromptSet()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            out.skip("bad_json")
            continue
        if not isinstance(rec, dict):
            out.skip("not_an_object")
            continue
        ref = rec.get("reference", rec.get("answer"))
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"] or not isinstance(ref, str):
            out.skip("missing_prompt_or_reference")
            continue
        out.records.append({"prompt": rec["prompt"], "reference": ref})
    if not out.records:
        raise CrucibleError(
            f"no usable record in {path} (skipped: {out.skipped or 'none'}); each line needs "
            '{"prompt": "...", "reference": "..."}'
        )
    return out


def normalize(text: str) -> str:
    """Whitespace-insensitive form for exact match."""
    return " ".join(text.split())


@torch.no_grad()
def prompt_accuracy(
    model: GPT,
    tokenizer: Tokenizer,
    eos: int,
    prompts: PromptSet,
    max_new_tokens: int,
    batch_size: int,
    template: Template | None = None,
    lockstep: bool = False,
) -> dict[str, Any]:
    """Greedy completions of every prompt and their exact match with the reference.

    A model fine-tuned on chat shards gets each prompt as a user turn in its template,
    followed by the assistant's header; its answer ends at the template's end marker.

    Args:
        model: the model, on the device to generate on.
        tokenizer: the run's tokenizer.
        eos: the id that ends a completion.
        prompts: from :func:`read_prompts` (prompts that cannot fit are counted in it).
        max_new_tokens: most tokens per completion.
        batch_size: prompts per generation batch.
        template: the chat template the model was fine-tuned with (None: plain text).
        lockstep: every rank of a sharded model runs this on the same prompts (see
            :func:`~crucible.model.generate.generate`).
    """
    from crucible.data_pipeline.chat import generation_prompt
    from crucible.model.generate import generate

    context = model.cfg.max_seq_len
    todo = []
    for rec in prompts.records:
        text = rec["prompt"]
        if template is not None:
            text = generation_prompt([("user", text)], template)
        ids = tokenizer.encode(text).ids
        if not ids:
            prompts.skip("empty_after_tokenizing")
        elif len(ids) + max_new_tokens > context:
            prompts.skip("too_long_for_context")
        else:
            todo.append((rec, ids))
    rows: list[dict[str, Any]] = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        outs = generate(
            model, [ids for _, ids in chunk], max_new_tokens, 0.0, None, 1.0, {eos},
            lockstep=lockstep,
        )  # fmt: skip
        for (rec, _), new in zip(chunk, outs, strict=True):
            text = tokenizer.decode([t for t in new if t != eos])
            if template is not None:
                text = text.split(template.end)[0]
            rows.append(rec | {"completion": text,
                               "exact": normalize(text) == normalize(rec["reference"])})  # fmt: skip
    n = len(rows)
    return {
        "evaluated": n,
        "exact_match": sum(r["exact"] for r in rows) / n if n else math.nan,
        "skipped": dict(prompts.skipped),
        "rows": rows,
    }


def markdown_report(title: str, ppl: dict[str, float] | None, acc: dict[str, Any] | None,
                    show: int = 20) -> str:  # fmt: skip
    """The evaluation as Markdown: perplexity, exact match, a sample of completions."""
    md = [f"# {title}", ""]
    if ppl is not None:
        md += [f"- held-out loss {ppl['loss']:.4f}, perplexity {ppl['perplexity']:.2f} over "
               f"{ppl['tokens']:,.0f} tokens"]  # fmt: skip
    if acc is not None:
        md += [f"- exact match {acc['exact_match']:.1%} of {acc['evaluated']} prompts"
               + (f" (skipped: {acc['skipped']})" if acc["skipped"] else ""),
               "", "| prompt | reference | completion | exact |", "|---|---|---|---|"]  # fmt: skip
        for r in acc["rows"][:show]:
            cells = [r["prompt"], r["reference"], r["completion"]]
            cells = [c.replace("|", "\\|").replace("\n", " ")[:120] for c in cells]
            md.append(f"| {' | '.join(cells)} | {'yes' if r['exact'] else 'no'} |")
    return "\n".join(md) + "\n"
