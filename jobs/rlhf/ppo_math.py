"""PPO's arithmetic on rollouts (InstructGPT's RLHF step; Ziegler et al. 2019 for the KL
controller), as plain tensor functions over ``[B, T]`` response tokens with a 0/1 ``mask``.

The formulas are TRL's and OpenRLHF's: a per-token reward of ``-kl_coef · (log π − log
π_ref)`` plus the reward model's score on the last response token; GAE over the response;
advantages whitened; the clipped surrogate ``max(−A·r, −A·clip(r, 1 ± ε))`` and the clipped
value loss ``½ · max((V − R)², (clip(V, V_old ± ε_v) − R)²)``, averaged over real tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability [B, T] of ``tokens`` [B, T] under ``logits`` [B, T, vocab] (the logits
    at the position before each token), in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens[..., None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [B, T] and the per-token KL estimate ``log π − log π_ref`` [B, T].

    Args:
        scores: the reward model's score of each sequence [B].
        logprobs: the policy's log-probabilities of the sampled tokens [B, T].
        ref_logprobs: the reference's [B, T].
        mask: 1 on response tokens [B, T] (each row's last 1 is where the score goes).
        kl_coef: the KL penalty's coefficient.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)
    rewards = rewards + last * scores[:, None]
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns [B, T] over the response tokens (the
    value after a row's last token is 0: the episode ends there).

    Args:
        rewards: per-token rewards [B, T] (0 off the mask).
        values: the critic's value of each position [B, T].
        mask: 1 on response tokens; a row's 1s are contiguous.
        gamma: discount.
        lam: GAE's λ.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(
    x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` on the mask, 0 elsewhere (the moments are the whole
    batch's, gathered over ranks by the caller)."""
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss, the fraction of tokens clipped and the approximate KL
    ``½ · mean((log π − log π_old)²)`` between the updated and the sampling policy.

    Args:
        logprobs: log π of the sampled tokens under the policy being updated [B, T].
        old_logprobs: log π at sampling time [B, T].
        advantages: [B, T].
        mask: 1 on response tokens.
        clip_range: ε.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_frac.detach(), approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss and the fraction of tokens where the clipped term won.

    Args:
        values: the critic's values now [B, T].
        old_values: its values at sampling time [B, T].
        returns: GAE returns [B, T].
        mask: 1 on response tokens.
        clip_range: how far a value may move from its old one before its loss is clipped.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(a, b), mask), masked_mean((b > a).float(), mask)


class KLController:
    """The KL penalty's coefficient: fixed, or adaptive (Ziegler et al. 2019) towards a
    target KL per sequence: ``coef ← coef · (1 + clip(KL / target − 1, ±0.2) · n / horizon)``.

    Args:
        coef: the starting coefficient.
        target: the KL per sequence aimed at (None: the coefficient stays fixed).
        horizon: sequences over which the error is corrected.
    """

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, sequences: int) -> None:
        """After a PPO step: ``kl`` the mean KL per sequence of its rollout."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * sequences / self.horizon


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` on the mask over every rank's batch (a collective)."""
    import torch.distributed as dist

    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    dist.all_reduce(sums)
    mean = sums[0] / sums[2]
    return mean.float(), (sums[1] / sums[2] - mean**2).clamp(min=0).float()


class RunningMoments:
    """The running mean and standard deviation of every score so far, over all ranks (Chan
    et al.'s parallel update), which normalise each step's scores; saved with checkpoints."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """Add this step's scores (every rank's: a collective), then return them centred and
        scaled by the running moments."""
        import torch.distributed as dist

        part = torch.stack(
            [scores.sum(), (scores**2).sum(), torch.tensor(float(scores.numel()))]
        ).double()
        dist.all_reduce(part)
        nb = float(part[2])
        mb = float(part[0]) / nb
        m2b = float(part[1]) - nb * mb * mb
        na, ma = self.count, self.mean
        n = na + nb
        delta = mb - ma
        self.mean = ma + delta * nb / n
        self.m2 = self.m2 + m2b + delta * delta * na * nb / n
        self.count = n
        std = math.sqrt(self.m2 / n) if n > 1 else 1.0
        return (scores - self.mean) / max(std, 1e-6)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
