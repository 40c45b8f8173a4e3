"""Fixtures of the train tests: a small shard set for the tiny model and train specs on it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crucible.jobs.spec import TrainRunSpec, parse_spec


@pytest.fixture(scope="session")
def standalone() -> Callable[..., str]:
    """``standalone(run_uri, nproc=2)``: run a prepared run's training under torchrun (the
    loop Ray Train runs); it must succeed. Returns its standard output (the job log)."""

    def run(uri: str, nproc: int = 2) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "crucible.jobs.train.standalone", uri, "--nproc", str(nproc)],
            capture_output=True, text=True, timeout=1800,  # a bound on a broken run
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out.stdout

    return run


@pytest.fixture
def make_spec(train_shards: Path) -> Callable[..., TrainRunSpec]:
    """``make_spec(name, storage, **section_overrides)``: the tiny model on 2 workers."""

    def make(name: str, storage: Path, **over: dict[str, Any]) -> TrainRunSpec:
        data: dict[str, Any] = {
            "kind": "train",
            "name": name,
            "cluster": {"storage": str(storage)},
            "model": {"preset": "tiny"},
            "data": {"shards": str(train_shards)},
            "optim": {
                "global_batch_size": 16,
                "micro_batch_size": 4,
                "warmup_steps": 5,
                "lr": 1e-3,
            },
            "checkpoint": {"every_steps": 5, "keep_last": 2, "keep_every": 10},
            "train": {"num_workers": 2, "max_steps": 20, "eval_every": 10, "eval_batches": 1},
        }
        for section, values in over.items():
            data[section] = {**data.get(section, {}), **values}
        spec = parse_spec(data)
        assert isinstance(spec, TrainRunSpec)
        return spec

    return make
