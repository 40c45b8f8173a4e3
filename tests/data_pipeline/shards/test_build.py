"""Shard build: contents, layout, manifest, determinism, crash safety, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crucible.cluster.storage import location
from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards import build as build_mod
from crucible.data_pipeline.shards.build import build_shards
from crucible.data_pipeline.shards.manifest import read_manifest
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer, tokenizer_fingerprint
from crucible.errors import CrucibleError


def _read_split(shards: Path, manifest, split: str) -> pa.Table:
    tables = [
        pa.ipc.open_stream(pa.memory_map(str(shards / s.file))).read_all()
        for s in manifest.splits[split].shards
    ]
    return pa.concat_tables(tables)


def test_shards_hold_every_document_token_in_order_after_the_shuffle(
    shard_set, documents, unpack_rows
) -> None:
    shards, m = shard_set
    table = pa.concat_tables([_read_split(shards, m, "train"), _read_split(shards, m, "heldout")])
    row_ids = table.column("row_id").to_numpy()
    assert sorted(row_ids.tolist()) == list(range(m.totals.rows))  # every row exactly once
    assert not np.array_equal(row_ids, np.sort(row_ids))  # and shuffled
    by_packing_order = table.take(pa.array(np.argsort(row_ids))).drop_columns(["row_id"])
    tok = load_tokenizer(shards / "tokenizer.json")
    got = unpack_rows(by_packing_order)
    expected = [(i, t) for i, t in documents[1] if t]
    assert [d for d, _ in got] == [d for d, _ in expected]
    for (_, ids), (_, text) in zip(got, expected, strict=True):
        assert ids.tolist() == tok.encode(text, add_special_tokens=False).ids
    empty = sum(1 for _, t in documents[1] if not t)
    assert (m.totals.documents, m.totals.empty_documents) == (len(documents[1]), empty)


def test_manifest_describes_the_files_exactly(shard_set) -> None:
    shards, m = shard_set
    assert read_manifest(shards) == m
    assert m.row_len == 33 and m.token_dtype == "uint16" and m.spec_hash == "spec-1"
    for split in m.splits.values():
        assert split.rows == sum(s.rows for s in split.shards)
        for s in split.shards:
            assert (shards / s.file).stat().st_size == s.bytes
            assert location(shards / s.file).sha256() == s.sha256
    assert m.splits["train"].rows + m.splits["heldout"].rows == m.totals.rows
    assert m.splits["heldout"].rows == round(m.totals.rows * 0.05)
    assert m.totals.bytes == sum(s.bytes for sp in m.splits.values() for s in sp.shards)
    assert m.tokenizer.fingerprint == tokenizer_fingerprint(
        load_tokenizer(shards / "tokenizer.json")
    )
    assert m.sources == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not [p for p in shards.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_datasets_load_from_disk_and_plain_pyarrow_open_the_shards(shard_set) -> None:
    shards, m = shard_set
    dd = datasets.load_from_disk(str(shards))
    assert set(dd) == {"train", "heldout"}
    assert dd["train"].num_rows == m.splits["train"].rows
    first = _read_split(shards, m, "train").slice(0, 1).to_pylist()[0]
    row = dd["train"][0]
    assert row["tokens"] == first["tokens"] and row["doc_ids"] == first["doc_ids"]
    assert len(row["tokens"]) == m.row_len
    tokens_type = pa.ipc.open_stream(
        pa.memory_map(str(shards / m.splits["train"].shards[0].file))
    ).schema
    assert tokens_type.field("tokens").type == pa.list_(pa.uint16(), 33)


def test_builds_are_deterministic_and_uint32_is_available(shard_set, fresh_shards) -> None:
    _, m = shard_set
    _, again = fresh_shards()
    assert again.fingerprint == m.fingerprint
    other, wide = fresh_shards(token_dtype="uint32", shuffle_seed=1, heldout_rows=3)
    assert wide.token_dtype == "uint32" and wide.splits["heldout"].rows == 3
    schema = pa.ipc.open_stream(
        pa.memory_map(str(other / wide.splits["train"].shards[0].file))
    ).schema
    assert schema.field("tokens").type.value_type == pa.uint32()


def test_loaded_tokenizer_gives_the_same_fingerprint(shard_set, fresh_shards) -> None:
    shards, m = shard_set
    _, loaded = fresh_shards(tokenizer={"path": str(shards / "tokenizer.json")})
    assert loaded.tokenizer.fingerprint == m.tokenizer.fingerprint
    assert loaded.totals.rows == m.totals.rows


def test_rerun_keeps_a_finished_set_and_refuses_another_specs(
    fresh_shards, documents, spec_dict
) -> None:
    out, m = fresh_shards()
    mtime = (out / "manifest.json").stat().st_mtime_ns
    spec = ShardSpec.model_validate(spec_dict)
    assert build_shards(documents[0], spec, out, LocalExecutor(), "spec-1") == m
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(CrucibleError, match="holds shards of another spec"):
        build_shards(documents[0], spec, out, LocalExecutor(), "spec-2")


def test_a_crash_before_the_manifest_leaves_no_shard_set(
    tmp_path, documents, monkeypatch, spec_dict
) -> None:
    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(build_mod, "write_manifest", crash)
    out = tmp_path / "shards"
    with pytest.raises(OSError, match="disk full"):
        build_shards(documents[0], ShardSpec.model_validate(spec_dict), out, LocalExecutor(), "x")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # a directory without a manifest is not a shard set
    with pytest.raises(CrucibleError, match="not a shard set"):
        read_manifest(out)


_KILLED_BUILD = """
import os, signal, sys
from crucible.data_pipeline.executors.local import LocalExecutor
from crucible.data_pipeline.shards import build
from crucible.data_pipeline.shards.spec import ShardSpec
import json
route = build.route_rows
def route_then_die(job):
    out = route(job)
    os.kill(os.getpid(), signal.SIGKILL)  # after the first packed file is routed
build.route_rows = route_then_die
spec = ShardSpec.model_validate(json.loads(sys.argv[3]))
build.build_shards(sys.argv[1], spec, sys.argv[2], LocalExecutor(), "spec-1")
"""


def test_a_build_killed_midway_is_never_complete_and_a_rerun_cleans_up(
    shard_set, documents, tmp_path, spec_dict
) -> None:
    import subprocess
    import sys

    out = tmp_path / "shards"
    cmd = [sys.executable, "-c", _KILLED_BUILD, str(documents[0]), str(out), json.dumps(spec_dict)]
    assert subprocess.run(cmd, check=False).returncode == -9
    assert (out / "_work").is_dir() and (out / "tokenizer.json").is_file()  # it got that far
    with pytest.raises(CrucibleError, match="not a shard set"):
        read_manifest(out)
    m = build_shards(
        documents[0], ShardSpec.model_validate(spec_dict), out, LocalExecutor(), "spec-1"
    )
    assert m.fingerprint == shard_set[1].fingerprint  # the same set as an uninterrupted build
    listed = {s.file for sp in m.splits.values() for s in sp.shards} | {"tokenizer.json"}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    hf = {"dataset_dict.json"} | {
        f"{s}/{f}" for s in m.splits for f in ("dataset_info.json", "state.json")
    }
    assert on_disk == listed | hf | {"manifest.json"}  # nothing left of the killed attempt


def test_bad_inputs_are_clear_errors(tmp_path, spec_dict, make_documents) -> None:
    spec = ShardSpec.model_validate(spec_dict)
    docs = tmp_path / "docs"
    make_documents(docs, files=1, docs=5)
    (docs / "_SUCCESS").unlink()
    with pytest.raises(CrucibleError, match="no _SUCCESS"):
        build_shards(docs, spec, tmp_path / "s", LocalExecutor(), "x")
    (docs / "_SUCCESS").touch()
    pq.write_table(pa.table({"id": ["a"]}), docs / "part-00009.parquet")
    with pytest.raises(CrucibleError, match=r"part-00009.parquet lacks column\(s\) text"):
        build_shards(docs, spec, tmp_path / "s", LocalExecutor(), "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["", None]}), empty / "part-0.parquet")
    (empty / "_SUCCESS").touch()
    with pytest.raises(CrucibleError, match="hold no text"):
        build_shards(
            empty,
            ShardSpec.model_validate({**spec_dict, "tokenizer": {"path": str(_tok(tmp_path))}}),
            tmp_path / "s",
            LocalExecutor(),
            "x",
        )
    (docs / "part-00009.parquet").unlink()
    with pytest.raises(CrucibleError, match="leaves no training rows"):
        build_shards(
            docs.parent / "docs",
            ShardSpec.model_validate({**spec_dict, "heldout_rows": 10**6}),
            tmp_path / "s",
            LocalExecutor(),
            "x",
        )
    assert not (tmp_path / "s").exists()


def _tok(tmp_path: Path) -> Path:
    from crucible.data_pipeline.shards.spec import TokenizerTrainSpec
    from crucible.data_pipeline.tokens.tokenizer import save_tokenizer, train_tokenizer

    p = tmp_path / "tokenizer.json"
    save_tokenizer(train_tokenizer(["some text here"] * 20, TokenizerTrainSpec(vocab_size=270)), p)
    return p
