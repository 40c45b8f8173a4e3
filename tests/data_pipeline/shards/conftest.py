"""Clean-documents Parquet (the contract's columns) and shard sets built from it."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.manifest import Manifest
from crucible.data_pipeline.shards.spec import ShardSpec

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
]


def write_documents(
    d: Path, files: int = 3, docs: int = 60, seed: int = 0
) -> list[tuple[str, str]]:
    """Write ``part-*.parquet`` + ``_SUCCESS``; return every ``(id, text)`` in file order.

    Lengths include empty documents and documents many rows long.
    """
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for f in range(files):
        ids = [f"f{f}-doc{i}" for i in range(docs)]
        texts = [
            " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 3, 40, 200, 900])))
            for _ in ids
        ]
        n = len(ids)
        table = pa.table(
            {
                "id": ids,
                "text": texts,
                "source": [f"in-{f}.jsonl"] * n,
                "url": pa.array([None] * n, pa.string()),
                "language": ["en"] * n,
                "language_score": pa.array([0.99] * n, pa.float32()),
            }
        )
        pq.write_table(table, d / f"part-{f:05d}.parquet")
        out.extend(zip(ids, texts, strict=True))
    (d / "_SUCCESS").touch()
    return out


SPEC = {
    "seq_len": 32,
    "rows_per_shard": 200,
    "heldout_fraction": 0.05,
    "tokenizer": {"train": {"vocab_size": 320}},
}


@pytest.fixture
def spec_dict() -> dict:
    """The shard spec (as YAML data) the shared sets are built with."""
    return dict(SPEC)


@pytest.fixture
def make_documents() -> Callable[..., list[tuple[str, str]]]:
    """:func:`write_documents`, for tests that need their own input."""
    return write_documents


@pytest.fixture(scope="session")
def documents(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A clean-documents directory and its documents."""
    d = tmp_path_factory.mktemp("run") / "documents"
    return d, write_documents(d)


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory, documents) -> tuple[Path, Manifest]:
    """A shard set built in-process from :func:`documents` (tests must not modify it)."""
    out = tmp_path_factory.mktemp("built") / "shards"
    return out, build_shards(
        documents[0], ShardSpec.model_validate(SPEC), out, LocalExecutor(), "spec-1"
    )


@pytest.fixture
def fresh_shards(tmp_path: Path, documents) -> Callable[..., tuple[Path, Manifest]]:
    """Build a private shard set (to corrupt or rebuild) with spec overrides."""

    def build(**over) -> tuple[Path, Manifest]:
        out = tmp_path / f"shards-{len(list(tmp_path.iterdir()))}"
        spec = ShardSpec.model_validate({**SPEC, **over})
        return out, build_shards(documents[0], spec, out, LocalExecutor(), "spec-1")

    return build
