"""PPO's arithmetic against direct implementations of its definitions (Schulman et al. 2017
for the clipped objective and GAE, Ziegler et al. 2019 for the adaptive KL coefficient)."""

from __future__ import annotations

import math

import pytest
import torch

from crucible.jobs.rlhf import ppo_math as pm


def _mask() -> torch.Tensor:
    # rows with answers at different offsets and lengths, as prompt + answer rows have
    return torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]]).float()


def test_gae_matches_the_recursion_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    mask = _mask()
    rewards = torch.randn(3, 6, generator=g) * mask
    values = torch.randn(3, 6, generator=g)
    gamma, lam = 0.9, 0.8
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        steps = mask[b].nonzero().flatten().tolist()
        a, want = 0.0, {}
        for i, t in reversed(list(enumerate(steps))):
            nxt = float(values[b, steps[i + 1]]) if i + 1 < len(steps) else 0.0
            delta = float(rewards[b, t]) + gamma * nxt - float(values[b, t])
            a = delta + gamma * lam * a
            want[t] = a
        for t in range(6):
            assert float(adv[b, t]) == pytest.approx(want.get(t, 0.0), abs=1e-6)
            if t in want:
                assert float(ret[b, t]) == pytest.approx(want[t] + float(values[b, t]), abs=1e-6)


def test_the_score_lands_on_each_rows_last_answer_token_beside_the_kl_penalty() -> None:
    mask = _mask()
    lp, ref = torch.full((3, 6), -1.0), torch.full((3, 6), -1.5)
    rewards, kl = pm.token_rewards(torch.tensor([2.0, 3.0, 4.0]), lp, ref, mask, kl_coef=0.1)
    assert torch.equal(kl, 0.5 * mask)
    expect = -0.05 * mask
    expect[0, 4] += 2.0
    expect[1, 5] += 3.0
    expect[2, 3] += 4.0
    assert torch.allclose(rewards, expect)


def test_the_clipped_objective_stops_the_ratio_leaving_the_trust_region() -> None:
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    new = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]])).requires_grad_(True)
    loss, clip_frac, approx_kl = pm.policy_loss(new, old, adv, mask, clip_range=0.2)
    # min(r·A, clip(r)·A): 1.2, 1.1, -0.8 (0.5 clipped up, the worse for A < 0), -0.9
    assert float(loss.detach()) == pytest.approx(-(1.2 + 1.1 - 0.8 - 0.9) / 4)
    assert float(clip_frac) == pytest.approx(0.5)  # tokens 0 and 2 clipped
    loss.backward()
    assert new.grad is not None
    # the clipped tokens carry no gradient: the objective holds no incentive past 1 ± ε
    assert new.grad[0, 0] == 0 and new.grad[0, 2] == 0
    assert new.grad[0, 1] != 0 and new.grad[0, 3] != 0
    want_kl = 0.5 * sum(math.log(x) ** 2 for x in (1.5, 1.1, 0.5, 0.9)) / 4
    assert float(approx_kl) == pytest.approx(want_kl, rel=1e-5)


def test_the_value_loss_takes_the_larger_of_clipped_and_unclipped() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, -1.0, 9.0]])
    new = torch.tensor([[0.5, 0.5, 9.0]])
    loss, frac = pm.value_loss(new, old, ret, mask, clip_range=0.2)
    # token 0: (0.5-1)² = .25 vs (0.2-1)² = .64; token 1: (0.5+1)² = 2.25 vs (0.2+1)² = 1.44
    assert float(loss) == pytest.approx(0.5 * (0.64 + 2.25) / 2)
    assert float(frac) == pytest.approx(0.5)


def test_whitening_and_logprobs() -> None:
    mask = _mask()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    w = pm.whiten(x, mask, mean, var)
    assert float(pm.masked_mean(w, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(pm.masked_mean(w * w, mask)) == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[mask == 0] == 0)
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([[1, 4, 0], [2, 2, 3]])
    lp = pm.token_logprobs(logits, tokens)
    assert torch.allclose(lp.exp(), torch.softmax(logits, -1).gather(2, tokens[..., None])[..., 0])


def test_the_adaptive_kl_coefficient_moves_towards_its_target_by_at_most_20_percent() -> None:
    fixed = pm.KLController(0.1, None, 100)
    fixed.update(50.0, 100)
    assert fixed.coef == 0.1
    kl = pm.KLController(0.1, target=1.0, horizon=100)
    kl.update(10.0, 100)  # far above the target: the error is capped at +0.2
    assert kl.coef == pytest.approx(0.12)
    kl.update(0.5, 50)  # below: (0.5 - 1) = -0.5, capped at -0.2, over half the horizon
    assert kl.coef == pytest.approx(0.12 * 0.9)
