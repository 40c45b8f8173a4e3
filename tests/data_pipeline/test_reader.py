"""Training reader: exact coverage, world-size independence, exact resume, checks on open."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.manifest import Manifest
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.data_pipeline.training_reader import IGNORE_INDEX, TrainingReader, epoch_order
from crucible.errors import CrucibleError

G = 8  # global batch size


def _build(root: Path, seed: int = 0) -> tuple[Path, Manifest]:
    docs = root / "documents"
    docs.mkdir(parents=True)
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "of", "and", "x"]
    ids = [f"doc{i}" for i in range(120)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([0, 5, 30, 150]))) for _ in ids]
    pq.write_table(pa.table({"id": ids, "text": texts}), docs / "part-00000.parquet")
    (docs / "_SUCCESS").touch()
    spec = ShardSpec.model_validate(
        {
            "seq_len": 16,
            "rows_per_shard": 64,
            "heldout_rows": 11,
            "tokenizer": {"train": {"vocab_size": 300}},
        }
    )
    return root / "shards", build_shards(docs, spec, root / "shards", LocalExecutor(), f"h{seed}")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("reader"))[0]


def _global_batches(shards: Path, world: int, steps: int, **kw) -> list[dict[str, torch.Tensor]]:
    readers = [TrainingReader(shards, G, rank=r, world_size=world, **kw) for r in range(world)]
    out = []
    for _ in range(steps):
        parts = [rd.next_batch() for rd in readers]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def test_an_epoch_is_every_sample_exactly_once_across_ranks(shards) -> None:
    r0 = TrainingReader(shards, G, rank=0, world_size=2)
    n = r0.num_samples
    assert n > 3 * G and n % G  # the epoch boundary falls inside a global batch
    steps = -(-n // G) + 2
    seen = torch.cat([b["sample_index"] for b in _global_batches(shards, 2, steps)]).numpy()
    np.testing.assert_array_equal(np.sort(seen[:n]), np.arange(n))
    every = np.arange(n)
    np.testing.assert_array_equal(seen[:n], epoch_order(0, 0, n)(every))
    np.testing.assert_array_equal(seen[n:], epoch_order(0, 1, n)(every)[: len(seen) - n])
    assert not np.array_equal(epoch_order(0, 0, n)(every), epoch_order(0, 1, n)(every))


def test_same_global_batches_for_1_2_and_4_ranks(shards) -> None:
    one, two, four = (_global_batches(shards, w, 12) for w in (1, 2, 4))
    for a, b, c in zip(one, two, four, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_resume_after_k_batches_yields_exactly_the_uninterrupted_batches(shards) -> None:
    full = _global_batches(shards, 2, 20)
    first = [TrainingReader(shards, G, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        for rd in first:
            rd.next_batch()
    state = first[0].state_dict()
    assert state["samples_consumed"] == 7 * G and state["epoch"] == 7 * G // first[0].num_samples
    # resume on a different data-parallel size: the global batches do not change
    resumed = [TrainingReader(shards, G, rank=r, world_size=4) for r in range(4)]
    for rd in resumed:
        rd.load_state_dict(state)
    for expect in full[7:]:
        parts = [rd.next_batch() for rd in resumed]
        got = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        for k in expect:
            assert torch.equal(expect[k], got[k])


def test_labels_are_shifted_inputs_and_doc_index_follows_eos(shards) -> None:
    rd = TrainingReader(shards, G)
    eos = rd.manifest.tokenizer.eos_id
    files = [shards / s.file for s in rd.manifest.splits["train"].shards]
    table = pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files)
    for _ in range(rd.num_samples // G):
        b = rd.next_batch()
        x, y, d = b["input_ids"], b["labels"], b["doc_index"]
        assert x.shape == y.shape == d.shape == (G, 16) and x.dtype == torch.int64
        real = y[:, :-1] != IGNORE_INDEX
        assert torch.equal(y[:, :-1][real], x[:, 1:][real])
        # a new document begins exactly after an EOS
        step = d[:, 1:] - d[:, :-1]
        assert torch.all(x[:, :-1][step == 1] == eos)
        assert torch.all((step == 0) | (step == 1) | (d[:, 1:] == -1))
        # and exactly where the stored doc_starts say (position 0 needs no step)
        for row, idx in zip(step, b["sample_index"].tolist(), strict=True):
            starts = table.slice(idx, 1).column("doc_starts").to_pylist()[0]
            want = [s - 1 for s in starts if 0 < s < 16]
            assert torch.nonzero(row == 1).flatten().tolist() == want


def test_heldout_pass_counts_every_sample_once_on_every_rank_count(shards) -> None:
    for world in (1, 2, 4):
        readers = [
            TrainingReader(shards, G, rank=r, world_size=world, split="heldout")
            for r in range(world)
        ]
        n = readers[0].num_samples
        assert n == 11
        per_rank = [list(rd.eval_batches()) for rd in readers]
        assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
        counted = [
            int(i)
            for batches in per_rank
            for b in batches
            for i, lab in zip(b["sample_index"], b["labels"], strict=True)
            if (lab != IGNORE_INDEX).any()
        ]
        assert sorted(counted) == list(range(n))


def test_batch_size_must_divide_by_world_size(shards) -> None:
    with pytest.raises(CrucibleError, match="not a positive multiple of the data-parallel size 3"):
        TrainingReader(shards, G, world_size=3)
    with pytest.raises(CrucibleError, match="rank 2 is outside"):
        TrainingReader(shards, G, rank=2, world_size=2)


def test_resume_on_other_shards_or_seed_is_refused_unless_allowed(shards, tmp_path) -> None:
    state = TrainingReader(shards, G).state_dict()
    other, _ = _build(tmp_path, seed=1)
    with pytest.raises(CrucibleError, match="set allow_manifest_change"):
        TrainingReader(other, G).load_state_dict(state)
    rd = TrainingReader(other, G, allow_manifest_change=True)
    rd.load_state_dict({**state, "samples_consumed": 24})
    assert rd.samples_consumed == 24
    with pytest.raises(CrucibleError, match="data seed is 0 but the reader's is 5"):
        TrainingReader(shards, G, seed=5).load_state_dict(state)


def test_a_flipped_byte_or_a_truncated_shard_is_named(tmp_path) -> None:
    shards, m = _build(tmp_path)
    target = shards / m.splits["train"].shards[1].file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    TrainingReader(shards, G, verify="size")  # same size: only the hash can tell
    with pytest.raises(CrucibleError, match=f"{target.name} is corrupted: sha256"):
        TrainingReader(shards, G)  # auto → sha256 for small sets
    target.write_bytes(bytes(data[:-10]))
    with pytest.raises(CrucibleError, match=f"{target.name} truncated: {len(data) - 10} bytes"):
        TrainingReader(shards, G, verify="size")


def test_shards_of_another_tokenizer_are_refused_with_both_fingerprints(shards) -> None:
    fp = TrainingReader(shards, G).manifest.tokenizer.fingerprint
    TrainingReader(shards, G, tokenizer_fingerprint=fp)
    with pytest.raises(
        CrucibleError, match=f"encoded with tokenizer {fp}, but this run uses tokenizer 0123abcd"
    ):
        TrainingReader(shards, G, tokenizer_fingerprint="0123abcd")


def test_doc_index_can_be_left_out(shards) -> None:
    b = TrainingReader(shards, G, doc_index=False).next_batch()
    assert set(b) == {"input_ids", "labels", "sample_index"}
