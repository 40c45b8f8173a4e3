"""PPOMetrics: a step's figures in the right series, run-wide ones from rank 0 only, and a bad
record never raising (metrics never stop a job)."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from crucible.monitoring.ppo_metrics import PPOMetrics

RECORD = {
    "score_mean": 0.7, "kl": 1.25, "kl_coef": 0.2, "clip_frac": 0.05, "value_loss": 0.3,
    "generation_seconds": 2.0, "score_seconds": 0.5, "train_seconds": 3.0,
    "generated_tokens": 640, "rollout_tokens": 1536,
}  # fmt: skip


def test_a_step_lands_in_its_series() -> None:
    m = PPOMetrics(rank=0, total_steps=40)
    for step in (1, 2):
        m.on_step(step, RECORD)
    v = m.registry.get_sample_value
    assert v("crucible_ppo_step") == 2 and v("crucible_ppo_total_steps") == 40
    assert v("crucible_ppo_score_mean") == 0.7 and v("crucible_ppo_kl") == 1.25
    assert v("crucible_ppo_kl_coef") == 0.2 and v("crucible_ppo_clip_fraction_ratio") == 0.05
    assert v("crucible_ppo_value_loss") == 0.3
    assert v("crucible_ppo_generated_tokens_total") == 1280
    assert v("crucible_ppo_rollout_tokens_total") == 3072
    for phase, seconds in (("generation", 4.0), ("scoring", 1.0), ("training", 6.0)):
        assert v("crucible_ppo_phase_seconds_total", {"phase": phase}) == seconds


def test_other_ranks_serve_their_own_phases_only_and_bad_records_do_not_raise() -> None:
    m = PPOMetrics(rank=1, total_steps=40)
    m.on_step(1, RECORD)
    text = generate_latest(m.registry).decode()
    assert "crucible_ppo_phase_seconds_total" in text and "crucible_ppo_step " not in text
    m.on_step(2, {"kl": math.inf})  # missing keys: logged once, the job goes on
    zero = PPOMetrics(rank=0, total_steps=1)
    zero.on_step(1, RECORD | {"kl": math.nan})
    assert math.isnan(zero.registry.get_sample_value("crucible_ppo_kl") or 0.0)
