"""Fixtures of the train tests: a small shard set for the tiny model and train specs on it."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.jobs.spec import TrainRunSpec, parse_spec

WORDS = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with"]


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 470 training rows of 65 tokens (tokenizer of 320 ids) and a held-out split."""
    root = tmp_path_factory.mktemp("train-data")
    docs = root / "documents"
    docs.mkdir()
    rng = random.Random(0)
    ids = [f"doc{i}" for i in range(120)]
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 40, 200, 900]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate(
        {
            "seq_len": 64,
            "rows_per_shard": 200,
            "heldout_fraction": 0.05,
            "tokenizer": {"train": {"vocab_size": 320}},
        }
    )
    build_shards(docs, spec, root / "shards", "local", "train-tests")
    return root / "shards"


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
