"""`crucible data inspect` / `trace` text."""

from __future__ import annotations

import pyarrow as pa
import pytest

from crucible.data_pipeline.shards.inspect import format_trace, inspect_shards, trace_sample
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.errors import CrucibleError


def test_inspect_shows_totals_checksums_and_a_decoded_sample(shard_set, documents) -> None:
    shards, m = shard_set
    text = inspect_shards(shards)
    assert f"{m.totals.rows:,} of 33 tokens (seq_len 32), uint16" in text
    assert f"train       {m.splits['train'].rows:,} rows" in text
    assert m.tokenizer.fingerprint in text
    assert "checksums   OK (sha256" in text
    first_doc = trace_sample(shards, 0)[0]
    assert f"documents {first_doc}" in text
    # the decoded sample is real text of the documents it came from
    decoded = text.splitlines()[-1].strip("'…").replace("<|endoftext|>", " ").split()
    words = {w for _, t in documents[1] for w in t.split()}
    assert decoded and set(decoded[1:-1]) <= words


def test_inspect_names_a_corrupted_shard(fresh_shards) -> None:
    shards, m = fresh_shards()
    bad = shards / m.splits["heldout"].shards[0].file
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    text = inspect_shards(shards)
    assert "checksums   1 bad file(s)" in text and f"✗ {bad} is corrupted" in text
    assert "size" in inspect_shards(shards, verify="size") and "bad file" not in inspect_shards(
        shards, verify="size"
    )


def test_trace_returns_the_documents_whose_tokens_the_sample_holds(shard_set, documents) -> None:
    shards, m = shard_set
    tok = load_tokenizer(shards / "tokenizer.json")
    texts = dict(documents[1])
    table = pa.ipc.open_stream(
        pa.memory_map(str(shards / m.splits["train"].shards[0].file))
    ).read_all()
    for i in range(20):
        row = table.slice(i, 1).to_pylist()[0]
        ids = trace_sample(shards, i)
        assert ids == row["doc_ids"]
        decoded = tok.decode(row["tokens"][: row["length"]], skip_special_tokens=False)
        decoded = decoded.replace("<|endoftext|>", " ")
        # every whole word of the sample occurs in one of the traced documents
        inner = decoded.split()[1:-1]
        assert all(any(w in texts[d].split() for d in ids) for w in inner)
    assert "train sample 3 (packed row" in format_trace(shards, 3)
    with pytest.raises(CrucibleError, match="out of range"):
        trace_sample(shards, 10**9)
    with pytest.raises(CrucibleError, match="no split 'valid'"):
        trace_sample(shards, 0, split="valid")
