"""What ``crucible data inspect`` and ``crucible data trace`` print about a shard set."""

from __future__ import annotations

import numpy as np

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.shards.manifest import read_manifest, resolve_verify, shard_problems
from crucible.data_pipeline.tokens.tokenizer import load_tokenizer
from crucible.data_pipeline.training_reader import SplitView, local_shards


def inspect_shards(
    path: str | Location, verify: str = "auto", sample: int = 0, max_chars: int = 400
) -> str:
    """Totals, splits, tokenizer, checksum status and one decoded sample of a shard set.

    Args:
        path: The shard directory (path or URI).
        verify: ``size``, ``sha256`` or ``auto``.
        sample: Index of the training sample to decode.
        max_chars: Cut the decoded text at this many characters.
    """
    d = location(path)
    m = read_manifest(d)
    t = m.totals
    lines = [
        f"shards      {d}  ({m.format}, manifest {m.fingerprint[:16]})",
        f"rows        {t.rows:,} of {m.row_len} tokens (seq_len {m.seq_len}), {m.token_dtype}",
        f"tokens      {t.document_tokens:,} from {t.documents - t.empty_documents:,} documents "
        f"({t.empty_documents:,} empty skipped), {t.padding_tokens:,} padding",
        f"bytes       {t.bytes:,}",
    ]
    for name, s in m.splits.items():
        lines.append(f"{name:<11} {s.rows:,} rows, {s.tokens:,} tokens in {len(s.shards)} file(s)")
    tk = m.tokenizer
    lines.append(
        f"tokenizer   vocab {tk.vocab_size:,}, eos {tk.eos_token!r}={tk.eos_id}, fingerprint {tk.fingerprint}"
    )
    lines.append(f"spec hash   {m.spec_hash or '-'}")
    how = resolve_verify(verify, m)
    problems = shard_problems(d, m, verify)
    status = "OK" if not problems else f"{len(problems)} bad file(s)"
    lines.append(
        f"checksums   {status} ({how}, {sum(len(s.shards) for s in m.splits.values()) + 1} files)"
    )
    lines.extend(f"  ✗ {p}" for p in problems)
    if not problems and m.splits["train"].rows:
        local = local_shards(d, m, ("train",))
        view = SplitView(local, m, "train")
        i = min(sample, view.num_samples - 1)
        tokens, length = view.rows(np.array([i]))
        ids = tokens[0][: int(length[0])].tolist()
        text = load_tokenizer(location(local / tk.file)).decode(ids, skip_special_tokens=False)
        cut = text[:max_chars] + ("…" if len(text) > max_chars else "")
        lines.append(f"sample {i}    documents {', '.join(view.doc_ids(i))}")
        lines.append(repr(cut))
    return "\n".join(lines)


def _view(path: str | Location, split: str) -> SplitView:
    d = location(path)
    m = read_manifest(d)
    return SplitView(local_shards(d, m, (split,)), m, split)


def trace_sample(path: str | Location, index: int, split: str = "train") -> list[str]:
    """Ids of the documents sample ``index`` of ``split`` was packed from, in order.

    Args:
        path: The shard directory.
        index: Sample index in the split's storage order (what the reader's ``sample_index`` holds).
        split: ``train`` or ``heldout``.
    """
    return _view(path, split).doc_ids(index)


def format_trace(path: str | Location, index: int, split: str = "train") -> str:
    """:func:`trace_sample` as text: the sample, its packing position and its documents.

    Args:
        path: The shard directory.
        index: Sample index in the split.
        split: ``train`` or ``heldout``.
    """
    view = _view(path, split)
    ids = view.doc_ids(index)
    head = f"{split} sample {index} (packed row {view.row_id(index)}) holds tokens of {len(ids)} document(s):"
    return "\n".join([head, *(f"  {i}" for i in ids)])
