"""The planner against crucible's own runs on a GPU.

``bench/results/gpu_check_h200_2026-11-30.json`` (issue #20): crucible's train job on one
H200, GPT-3 1.3B and 2.7B at sequence length 2048, micro-batch 8, ZeRO-3, bf16, no
activation checkpointing; the median step time and ``torch.cuda.max_memory_allocated``.
The spec and the planner call are those of ``bench/bench_gpu.py`` (``predicted``). Before
the memory and fetch terms the planner said 0.200 s and 0.395 s (−51% and −44%): on one GPU
there is no communication to hide behind, and a model this narrow spends half its step
outside the matmuls. The same :class:`~crucible.cluster.plan.StepModel` constants serve
the published A100 runs of ``test_planner_published.py``.
"""

from __future__ import annotations

import pytest

from crucible.cluster.plan import plan_from_spec
from crucible.jobs.spec import parse_spec


def _h200_spec(preset: str, tmp_path):  # type: ignore[no-untyped-def]
    return parse_spec(
        {
            "kind": "train",
            "name": f"bench-{preset}",
            "cluster": {"storage": str(tmp_path), "gpu": "h200", "gpus_per_node": 1},
            "model": {
                "preset": preset,
                "max_seq_len": 2048,
                "parallel": {"activation_checkpointing": False},
            },
            "data": {"shards": str(tmp_path / "shards")},
            "optim": {"global_batch_size": 8, "micro_batch_size": 8, "warmup_steps": 2},
            "train": {"num_workers": 1, "max_steps": 10_000},
        }
    )


@pytest.mark.parametrize(
    ("preset", "step_seconds", "peak_bytes"),
    [
        # crucible-gpt3-1.3b-mbs8: 0.410 s (bare DeepSpeed 0.396 s), 55.5 GiB.
        ("gpt3-1.3b", 0.4101, 59_584_795_136),
        # crucible-gpt3-2.7b-mbs8: 0.709 s (bare DeepSpeed 0.693 s), 91.5 GiB.
        ("gpt3-2.7b", 0.7089, 98_220_182_016),
    ],
)
def test_h200_step_time_and_memory_within_10_percent(preset, step_seconds, peak_bytes, tmp_path):
    pl = plan_from_spec(_h200_spec(preset, tmp_path), alternatives=False)
    assert pl.feasible, pl.problems
    assert pl.comm_seconds == 0 and pl.bound == "compute"
    assert pl.step_seconds == pytest.approx(step_seconds, rel=0.10)
    assert pl.memory_bytes == pytest.approx(peak_bytes, rel=0.10)
    # Outside the matmuls is where the time was missing: 40-60% of these steps.
    assert pl.memory_seconds + pl.fetch_seconds > 0.4 * pl.step_seconds
