"""Straggler detection: the detector on synthetic per-rank times, and two gloo ranks where one
sleeps in its compute and rank 0 names it."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from crucible.jobs.train.callbacks import StepResult, TrainContext
from crucible.jobs.train.callbacks.straggler import StragglerCallback, StragglerDetector


def test_noisy_but_healthy_ranks_stay_quiet() -> None:
    rng = random.Random(0)
    det = StragglerDetector(factor=1.5, checks=3)
    for _ in range(200):
        v = det.check([1.0 * rng.uniform(0.8, 1.25) for _ in range(64)])
        assert v.stragglers == [] and v.new == []
        assert all(0.5 < r < 1.5 for r in v.ratios)


def test_one_rank_twice_as_slow_is_reported_after_k_checks_and_clears() -> None:
    det = StragglerDetector(factor=1.5, checks=3)
    times = [1.0] * 8
    times[5] = 2.0
    verdicts = [det.check(times) for _ in range(4)]
    assert [v.stragglers for v in verdicts] == [[], [], [5], [5]]
    assert [v.new for v in verdicts] == [[], [], [5], []]
    assert verdicts[2].ratios[5] == 2.0 and verdicts[2].median_seconds == 1.0
    back = det.check([1.0] * 8)
    assert back.stragglers == [] and back.recovered == [5]


def test_one_fast_check_resets_the_streak() -> None:
    det = StragglerDetector(factor=1.5, checks=3)
    slow, ok = [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    for times in (slow, slow, ok, slow, slow):
        assert det.check(times).stragglers == []
    assert det.check(slow).stragglers == [2]


def test_near_zero_times_and_missing_ranks_never_flag() -> None:
    det = StragglerDetector(factor=1.5, checks=1)
    v = det.check([1e-5, 1e-5, 5e-5])  # 5x the median, but 40 µs
    assert v.stragglers == []
    v = det.check([1.0, math.nan, 1.1])  # a rank without samples is left out
    assert v.stragglers == [] and math.isnan(v.ratios[1])
    assert det.check([0.0, 0.0, 0.0]).ratios == [1.0, 1.0, 1.0]


def _ctx(rank: int, world: int, every: int, checks: int) -> TrainContext:
    train = SimpleNamespace(
        straggler_check_every=every, straggler_factor=1.5, straggler_checks=checks
    )
    spec = SimpleNamespace(train=train)
    return cast(
        TrainContext, SimpleNamespace(spec=spec, rank=rank, world=world, use_gpu=False, engine=None)
    )


def _result(step: int, data_wait: float, engine: float) -> StepResult:
    return StepResult(
        step=step, loss=1.0, lr=1e-3, grad_norm=1.0, tokens=64, samples=2, started=0.0,
        seconds=data_wait + engine, data_wait_seconds=data_wait, engine_seconds=engine,
    )  # fmt: skip


def test_a_single_rank_run_never_gathers() -> None:
    cb = StragglerCallback(_ctx(0, 1, every=1, checks=1), metrics=None)
    cb.on_start()
    cb.on_step_end(_result(1, 0.0, 1.0))  # no process group: a gather would raise
    assert cb.every == 0


def _rank_main(rank: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from crucible.jobs.train.callbacks import straggler
    from crucible.monitoring.metrics import TrainMetrics

    lines: list[str] = []
    straggler.say = lines.append  # type: ignore[assignment]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    metrics = TrainMetrics(1e6, 1e6, num_devices=2, peak_flops_per_device=1e12, rank=rank)
    cb = StragglerCallback(_ctx(rank, 2, every=4, checks=2), metrics)
    cb.on_start()
    gathers: list[float] = []
    for step in range(1, 13):
        t0 = time.perf_counter()
        time.sleep(0.01 + (0.02 if rank == 1 else 0.0))  # rank 1's compute is slow
        engine = time.perf_counter() - t0
        dist.all_reduce(torch.ones(1))  # the step's collective: both ranks leave together
        t1 = time.perf_counter()
        cb.on_step_end(_result(step, 0.0, engine))
        if step % 4 == 0:
            gathers.append(time.perf_counter() - t1)
    reg = metrics.registry
    got = {
        "lines": lines,
        "hosts": cb.hosts,
        "straggler": reg.get_sample_value("crucible_train_straggler"),
        "ratio": reg.get_sample_value("crucible_train_rank_slowdown_ratio"),
        "check_seconds": min(gathers),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_two_gloo_ranks_rank_0_names_the_slow_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_rank_main, args=(init, str(tmp_path)), nprocs=2, join=True)
    got: list[dict[str, Any]] = [
        json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)
    ]
    assert got[0]["straggler"] == 0.0 and got[1]["straggler"] == 1.0
    assert got[1]["ratio"] > 1.5 > got[0]["ratio"]
    host = got[0]["hosts"][1]
    assert len(got[0]["lines"]) == 1, got[0]["lines"]
    assert got[0]["lines"][0].startswith(f"straggler: rank 1 on {host} is ")
    assert got[1]["lines"] == []  # only rank 0 writes the job log's line
    print(f"check (gather + judge) on 2 gloo ranks: {got[0]['check_seconds'] * 1e3:.2f} ms")
