"""Fixtures of the data pipeline tests: a generated corpus, one in-process Ray for the session."""

from __future__ import annotations

from typing import Any

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
    yield ray
    ray.shutdown()
