"""Fixtures of the data pipeline tests: a generated corpus, one in-process Ray for the session,
and the inverse of packing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from crucible.data_pipeline.sample import generate_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small mixed JSONL/WARC corpus with planted duplicates, junk and bad lines."""
    root = tmp_path_factory.mktemp("corpus")
    truth = generate_corpus(root / "in", n_docs=240, seed=7)
    truth["dir"] = root / "in"
    return truth


@pytest.fixture(scope="session")
def ray_local() -> Any:
    """Ray started in this process (never attached to another engineer's cluster)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    # Every shuffle starts its aggregator actors (new processes) anew; with the tests' tiny
    # data one per shuffle does the work of two at half the process starts. Partition counts,
    # and so the code paths under test, are unchanged.
    ctx = DataContext.get_current()
    before, ctx.max_hash_shuffle_aggregators = ctx.max_hash_shuffle_aggregators, 1
    yield ray
    ctx.max_hash_shuffle_aggregators = before
    ray.shutdown()


def _unpack_rows(table: pa.Table) -> list[tuple[str, np.ndarray]]:
    """Invert packing: the documents of a packing stream's rows, as ``(doc_id, tokens)``.

    Args:
        table: All rows of one packing stream, in packing order (EOS separators removed).
    """
    L = table.schema.field("tokens").type.list_size
    tokens = table.column("tokens").combine_chunks().values.to_numpy().astype(np.int64)
    lengths = table.column("length").to_numpy()
    valid = np.concatenate([tokens[i * L : i * L + int(n)] for i, n in enumerate(lengths)])
    row_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts: list[int] = []
    ids: list[str] = []
    for i, (row_starts, row_ids) in enumerate(
        zip(
            table.column("doc_starts").to_pylist(), table.column("doc_ids").to_pylist(), strict=True
        )
    ):
        continued = not row_starts or row_starts[0] != 0
        if i == 0 and continued:
            raise ValueError("the first row continues a document: not a whole packing stream")
        starts.extend(int(row_start[i]) + s for s in row_starts)
        ids.extend(row_ids[1:] if continued else row_ids)
    bounds = [*starts, len(valid)]
    # every document's span ends with its EOS separator
    return [(d, valid[a : b - 1]) for d, a, b in zip(ids, bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture(scope="session")
def unpack_rows() -> Callable[[pa.Table], list[tuple[str, np.ndarray]]]:
    """Invert packing (a test oracle: training never needs it)."""
    return _unpack_rows
