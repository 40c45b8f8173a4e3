"""The reward model: a scalar per position from the GPT's trunk, and InstructGPT's ranking loss
over every pair of a prompt's answers, averaged per prompt."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from crucible.model.gpt import GPT, build_model, init_weights
from crucible.model.reward import RewardModel, init_score, ranking_stats
from crucible.model.spec import resolve_model

I = -100  # noqa: E741


def test_ranking_stats_take_every_pair_of_each_prompt_once() -> None:
    # row 0: a prompt of 3 answers (ranks 1, 2, 3 at positions 1, 3, 5); row 1: a prompt of
    # 2 answers, then the start of another prompt of 2
    ranks = torch.tensor([[I, 1, I, 2, I, 3, I, I], [1, I, 2, I, 1, I, 2, I]])
    rewards = torch.zeros(2, 8)
    rewards[0, [1, 3, 5]] = torch.tensor(
        [3.0, 1.0, 2.0]
    )  # pairs (1,2) and (1,3) right, (2,3) wrong
    rewards[1, [0, 2, 4, 6]] = torch.tensor([0.5, 0.0, -1.0, 1.0])  # right, wrong
    loss_sum, prompts, right, pairs = ranking_stats(rewards, ranks)
    assert (int(prompts), int(right), int(pairs)) == (3, 3, 5)

    def nll(d: float) -> float:
        return -math.log(1 / (1 + math.exp(-d)))

    expected = (nll(2.0) + nll(1.0) + nll(-1.0)) / 3 + nll(0.5) + nll(-2.0)
    assert float(loss_sum) == pytest.approx(expected, rel=1e-6)


def test_no_comparisons_no_pairs() -> None:
    loss_sum, prompts, right, pairs = ranking_stats(torch.zeros(2, 4), torch.full((2, 4), I))
    assert (float(loss_sum), int(prompts), int(right), int(pairs)) == (0.0, 0, 0, 0)


def test_reward_model_is_the_gpt_trunk_with_a_scalar_head() -> None:
    cfg = resolve_model("tiny")
    gpt = init_weights(build_model(cfg, device="cpu"), seed=0)
    rm = init_weights(build_model(cfg, device="cpu", cls=RewardModel), seed=0)
    names = set(dict(rm.named_parameters()))
    assert names == (set(dict(gpt.named_parameters())) - {"lm_head.weight"}) | {"score.weight"}
    rm.load_state_dict(gpt.state_dict() | {"score.weight": rm.score.weight}, strict=False)
    init_score(rm)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    rewards, loss = rm(tokens)
    assert rewards.shape == (2, 16) and loss is None and not rewards.any()  # zero head
    with torch.no_grad():  # the trunk is the GPT's: its hidden states, to the bit
        assert torch.equal(rm.hidden(tokens), gpt.hidden(tokens))
        logits, _ = gpt(tokens)
        assert torch.equal(logits, F.linear(gpt.hidden(tokens), gpt.lm_head.weight))


def test_ranking_loss_trains_the_head_and_the_trunk() -> None:
    torch.manual_seed(0)
    rm = init_weights(build_model(resolve_model("tiny"), device="cpu", cls=RewardModel), seed=0)
    tokens = torch.randint(0, 512, (2, 12))
    ranks = torch.full((2, 12), I)
    ranks[:, 5], ranks[:, 11] = 1, 2
    _, loss = rm(tokens, ranks)
    assert loss is not None
    loss.backward()
    assert rm.score.weight.grad is not None and rm.score.weight.grad.abs().sum() > 0
    assert rm.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
    # padding rows alone (an evaluation's filler) give a zero loss that still backprops
    rm.zero_grad()
    _, empty = rm(tokens, torch.full((2, 12), I))
    assert empty is not None and float(empty.detach()) == 0.0
    empty.backward()


def test_a_plain_gpt_is_still_built_by_default() -> None:
    assert type(build_model(resolve_model("tiny"))) is GPT
