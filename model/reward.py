"""A reward model: the GPT's trunk with a scalar head in place of the language-model head
(InstructGPT's RM, Ouyang et al. 2022), trained on ranked answers to one prompt.

Each comparison is packed whole into one row: its answers' conversations back to back, each
attending only to itself, best first, and the targets hold each answer's rank (1 = best) at
its last token, where the answer is scored. The loss is InstructGPT's: for every pair of
answers to a prompt, -log σ(r_better − r_worse), averaged over the prompt's K·(K−1)/2 pairs
and then over prompts, so that a prompt with many answers does not outweigh one with two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from crucible.model.gpt import GPT

if TYPE_CHECKING:
    from crucible.model.config import ModelConfig
    from crucible.model.kv_cache import KVCache

IGNORE = -100


class RewardModel(GPT):
    """GPT whose output is a scalar per position (``score``) instead of next-token logits.

    Parameter names are the GPT's (a fine-tuned checkpoint loads into it as it is), less
    ``lm_head`` and plus ``score.weight``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.lm_head  # with tied embeddings the table stays, as tok_emb
        self.score = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards [B, T] (float32) of every position, and the ranking loss against
        ``targets`` [B, T] (answer ranks at answers' last tokens, -100 elsewhere)."""
        rewards = self.score(self.hidden(tokens, doc_ids, cache, positions)).squeeze(-1).float()
        if targets is None:
            return rewards, None
        loss_sum, groups, _, _ = ranking_stats(rewards, targets)
        # a micro-batch without comparisons (padding rows of an evaluation) still backprops
        return rewards, loss_sum / groups.clamp(min=1) + rewards.sum() * 0.0


def ranking_stats(
    rewards: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum over prompts of their mean pair loss, prompts, pairs ordered right, pairs)``.

    Answers are found where ``ranks`` is positive, in row order; a prompt's answers are
    written best first, so each rank 1 opens a new prompt.

    Args:
        rewards: [B, T] reward of every position.
        ranks: [B, T] rank (1 = best) at each answer's scored token, -100 elsewhere.
    """
    rows, cols = (ranks > 0).nonzero(as_tuple=True)
    r, k = rewards[rows, cols].float(), ranks[rows, cols]
    prompt = torch.cumsum((k == 1).long(), 0)
    better = (prompt[:, None] == prompt[None, :]) & (k[:, None] < k[None, :])
    i, j = better.nonzero(as_tuple=True)
    diff = r[i] - r[j]
    pairs_per_prompt = torch.zeros(int(prompt.max()) + 1 if prompt.numel() else 1,
                                   device=r.device).index_add_(0, prompt[i], torch.ones_like(diff))  # fmt: skip
    weight = 1.0 / pairs_per_prompt[prompt[i]]
    loss_sum = (-F.logsigmoid(diff) * weight).sum()
    groups = (pairs_per_prompt > 0).sum()
    return loss_sum, groups, (diff > 0).sum(), torch.tensor(diff.numel(), device=r.device)


def init_score(model: RewardModel) -> None:
    """Zero the scalar head: every answer starts at reward 0 and the trunk is the base's.
    Under ZeRO-3 each rank zeroes its own partition, which zeroes the whole."""
    p = model.score.weight
    with torch.no_grad():
        getattr(p, "ds_tensor", p).zero_()
