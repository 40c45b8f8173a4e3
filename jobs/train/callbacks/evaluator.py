"""Held-out loss every ``train.eval_every`` steps, over the first ``train.eval_batches`` global
batches of the shards' held-out split (the same batches every time); for a reward model, its
ranking loss and accuracy; for a masked-LM, its loss and accuracy on the masked tokens."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from crucible.jobs.spec import RewardRunSpec
from crucible.jobs.train.callbacks.base import Callback, StepResult, TrainContext
from crucible.jobs.train.engine import micro_batches, model_inputs

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from crucible.data_pipeline.training_reader import TrainingReader


def held_out_sums(
    engine: DeepSpeedEngine,
    reader: TrainingReader,
    batches: int,
    micro: int,
    sums: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]],
    width: int,
) -> torch.Tensor:
    """``sums(micro_batch)`` added up (float64) over the first ``batches`` global batches of
    the held-out split and over all ranks, with the engine in eval mode and no gradients.

    Args:
        engine: the DeepSpeed engine.
        reader: a held-out :class:`TrainingReader` of this rank.
        batches: global batches to evaluate.
        micro: rows per forward pass.
        sums: the ``width`` figures one micro-batch adds.
        width: how many figures ``sums`` gives.
    """
    device = engine.device
    total = torch.zeros(width, dtype=torch.float64, device=device)  # NCCL reduces device tensors
    engine.eval()
    with torch.no_grad():
        for batch in islice(reader.eval_batches(), batches):
            for mb in micro_batches(batch, micro, device):
                total += torch.stack([t.double() for t in sums(mb)])
    engine.train()
    dist.all_reduce(total)
    return total


def evaluate(
    engine: DeepSpeedEngine, reader: TrainingReader, batches: int, micro: int, doc_mask: bool
) -> float:
    """Token-weighted held-out loss over the first ``batches`` global batches of the split.

    Args:
        engine: the DeepSpeed engine.
        reader: a held-out :class:`TrainingReader` of this rank.
        batches: global batches to evaluate.
        micro: rows per forward pass.
        doc_mask: attend within documents only.
    """

    def sums(mb: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        doc_ids = mb.get("doc_index") if doc_mask else None
        logits, _ = engine(mb["input_ids"], doc_ids=doc_ids, positions=mb.get("position_ids"))
        labels = mb["labels"]
        flat = logits.float().view(-1, logits.size(-1))
        loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="sum")
        return [loss, (labels != -100).sum()]

    total = held_out_sums(engine, reader, batches, micro, sums, 2)
    return float(total[0] / total[1].clamp(min=1))


def evaluate_reward(
    engine: DeepSpeedEngine, reader: TrainingReader, batches: int, micro: int
) -> tuple[float, float]:
    """A reward model's held-out ``(ranking loss per prompt, accuracy)`` over the first
    ``batches`` global batches: accuracy is the share of answer pairs whose better answer gets
    the higher reward (every pair of every prompt counted once).

    Args:
        engine: the DeepSpeed engine of a reward model.
        reader: a held-out :class:`TrainingReader` of this rank (comparison shards).
        batches: global batches to evaluate.
        micro: rows per forward pass.
    """
    from crucible.model.reward import ranking_stats

    def sums(mb: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        rewards, _ = engine(mb["input_ids"], doc_ids=mb["doc_index"], positions=mb["position_ids"])
        return list(ranking_stats(rewards, mb["labels"]))

    total = held_out_sums(engine, reader, batches, micro, sums, 4)
    return float(total[0] / total[1].clamp(min=1)), float(total[2] / total[3].clamp(min=1))


def evaluate_mlm(
    engine: DeepSpeedEngine, reader: TrainingReader, batches: int, micro: int
) -> tuple[float, float]:
    """A masked-LM's held-out ``(loss, accuracy)`` over the masked tokens of the first
    ``batches`` global batches: cross-entropy per masked token, and the share of masked
    tokens whose original the model ranks first (the masks are a function of the sample and
    the data seed, so every evaluation sees the same ones).

    Args:
        engine: the DeepSpeed engine of a BERT.
        reader: a held-out masked-LM :class:`TrainingReader` of this rank.
        batches: global batches to evaluate.
        micro: rows per forward pass.
    """

    def sums(mb: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = model_inputs(mb)
        inputs.pop("nsp_labels", None)  # the masked-LM loss alone
        logits, _ = engine(mb["input_ids"], mb["labels"], **inputs)
        target = mb["labels"][mb["labels"] != -100]
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        right = (logits.argmax(-1) == target).sum()
        return [loss, right, target.new_tensor(target.numel())]

    total = held_out_sums(engine, reader, batches, micro, sums, 3)
    return float(total[0] / total[2].clamp(min=1)), float(total[1] / total[2].clamp(min=1))


def evaluate_prompts(ctx: TrainContext) -> float:
    """Greedy exact match of ``train.eval_prompts`` (prompt/reference JSONL) by the model
    being trained. Every rank decodes every prompt in lockstep (a ZeRO-3 forward needs all
    ranks), so all get the same completions; the run's tokenizer and chat template are its
    shards'.

    Args:
        ctx: the rank's training context.
    """
    from crucible.cluster.storage import location
    from crucible.data_pipeline.chat import TEMPLATES
    from crucible.data_pipeline.shards.manifest import read_manifest
    from crucible.jobs.cli.generate import run_tokenizer
    from crucible.jobs.evaluation import prompt_accuracy, read_prompts

    spec = ctx.spec
    assert spec.train.eval_prompts is not None
    tok, eos = run_tokenizer(spec.data.shards)
    chat = read_manifest(spec.data.shards).chat_template
    prompts = read_prompts(location(spec.train.eval_prompts))
    with torch.no_grad():
        acc = prompt_accuracy(
            ctx.engine.module, tok, eos, prompts, spec.train.eval_max_new_tokens,
            batch_size=64, template=TEMPLATES[chat] if chat else None, lockstep=True,
        )  # fmt: skip
    return float(acc["exact_match"])


class EvaluatorCallback(Callback):
    """Adds ``heldout_loss`` (and a reward model's accuracy, or the exact match of
    ``train.eval_prompts``) to the steps it evaluates at and tells the other callbacks.

    Args:
        ctx: the rank's training context.
    """

    def __init__(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.heldout: TrainingReader | None = None

    def on_start(self) -> None:
        from crucible.data_pipeline.training_reader import TrainingReader

        spec = self.ctx.spec
        if spec.train.eval_every:
            self.heldout = TrainingReader(
                spec.data.shards, spec.optim.global_batch_size, rank=self.ctx.rank,
                world_size=self.ctx.world, split="heldout", verify="size",
                doc_index=spec.data.mask_cross_document, mlm=spec.objective if spec.objective.kind == "mlm" else None,
            )  # fmt: skip

    def on_step_end(self, result: StepResult) -> None:
        t = self.ctx.spec.train
        if self.heldout is None or result.step % t.eval_every:
            return
        t0 = time.time()
        micro = self.ctx.plan.micro_batch_size
        if isinstance(self.ctx.spec, RewardRunSpec):
            result.heldout_loss, result.heldout_accuracy = evaluate_reward(
                self.ctx.engine, self.heldout, t.eval_batches, micro
            )
        elif self.ctx.spec.objective.kind == "mlm":
            result.heldout_loss, result.heldout_accuracy = evaluate_mlm(
                self.ctx.engine, self.heldout, t.eval_batches, micro
            )
        else:
            result.heldout_loss = evaluate(
                self.ctx.engine, self.heldout, t.eval_batches, micro,
                self.ctx.spec.data.mask_cross_document,
            )  # fmt: skip
            if t.eval_prompts is not None:
                result.heldout_exact_match = evaluate_prompts(self.ctx)
        self.ctx.callbacks.on_eval(result.heldout_loss, t0, time.time(), result.scores())
