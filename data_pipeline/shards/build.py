"""Clean documents → tokenizer → packed rows → shuffled, checksummed Arrow shards + manifest.

Stages, each deterministic: (1) train or load the tokenizer; (2) encode and pack every input
file on its own (one packing stream per file, in file order), in parallel as Ray Data tasks;
(3) permute all rows with a seeded permutation, put the first rows of it in the held-out
split and cut both splits into shard files, again in parallel; (4) write the Hugging Face
metadata and, last, ``manifest.json``. Everything is built in a temporary sibling directory
that is renamed into place, so ``out_dir`` is either absent or a complete shard set.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from crucible.data_pipeline.shards import hf_layout
from crucible.data_pipeline.shards.manifest import (
    MANIFEST,
    Manifest,
    ShardFile,
    Split,
    TokenizerInfo,
    Totals,
    file_sha256,
    read_manifest,
    shard_problems,
    write_manifest,
)
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.data_pipeline.tokens.pack import PackStats, encode_and_pack, row_schema, token_dtype
from crucible.data_pipeline.tokens.tokenizer import (
    build_tokenizer,
    canonical_json,
    eos_id,
    save_tokenizer,
    tokenizer_fingerprint,
)
from crucible.errors import CrucibleError

Executor = Literal["ray", "local"]
SPLITS = ("train", "heldout")


def build_shards(
    documents_dir: Path,
    spec: ShardSpec,
    out_dir: Path,
    executor: Executor = "ray",
    spec_hash: str = "",
) -> Manifest:
    """Build the training shard set of ``documents_dir`` in ``out_dir``.

    A finished shard set with the same ``spec_hash`` is kept and returned (reruns skip it).

    Args:
        documents_dir: Clean documents: ``part-*.parquet`` (columns ``id``, ``text``) and ``_SUCCESS``.
        spec: The shard spec.
        out_dir: The shard directory to create (e.g. ``<run_dir>/shards``).
        executor: ``ray`` (Ray Data tasks) or ``local`` (in-process, same results).
        spec_hash: Hash of the producing pipeline spec, recorded in the manifest.

    Returns:
        The manifest of the shard set.
    """
    out_dir = Path(out_dir)
    files = document_files(Path(documents_dir))
    if (out_dir / MANIFEST).is_file():
        old = read_manifest(out_dir)
        if old.spec_hash != spec_hash:
            raise CrucibleError(
                f"{out_dir} holds shards of another spec (hash {old.spec_hash[:12]}, this one "
                f"{spec_hash[:12]}); move it away or use another run directory"
            )
        if not shard_problems(out_dir, old, "size"):
            return old
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        manifest = _build(files, spec, tmp, executor, spec_hash)
        if out_dir.exists():  # no manifest, or a damaged set of this very spec: not worth keeping
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def document_files(documents_dir: Path) -> list[Path]:
    """The complete input files, sorted; errors when the documents step did not finish.

    Args:
        documents_dir: ``<run_dir>/documents``.
    """
    if not documents_dir.is_dir():
        raise CrucibleError(
            f"documents directory {documents_dir} does not exist; run the data pipeline first"
        )
    if not any(
        (documents_dir / m).is_file() for m in ("_SUCCESS", "manifest.json", "_manifest.json")
    ):
        raise CrucibleError(
            f"{documents_dir} has no _SUCCESS marker: the documents step did not finish; rerun it"
        )
    files = sorted(documents_dir.glob("part-*.parquet"))
    if not files:
        raise CrucibleError(f"{documents_dir} has no part-*.parquet files; nothing to tokenize")
    for f in files:
        names = pq.read_schema(f).names
        missing = [c for c in ("id", "text") if c not in names]
        if missing:
            raise CrucibleError(
                f"{f} lacks column(s) {', '.join(missing)}; it is not a clean-documents file"
            )
    return files


def _texts(files: list[Path]) -> Iterator[str]:
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["text"]):
            yield from (t for t in b.column(0).to_pylist() if t)


def _build(
    files: list[Path], spec: ShardSpec, tmp: Path, executor: Executor, spec_hash: str
) -> Manifest:
    tok = build_tokenizer(spec.tokenizer, _texts(files))
    save_tokenizer(tok, tmp / "tokenizer.json")
    eos = eos_id(tok, spec.tokenizer.eos)
    dtype = token_dtype(tok.get_vocab_size(), spec.token_dtype)
    work = tmp / "_work"
    work.mkdir()

    packed = [str(work / f"packed-{i:05d}.arrow") for i in range(len(files))]
    jobs = [
        {
            "path": str(f),
            "out": packed[i],
            "tokenizer": canonical_json(tok),
            "seq_len": spec.seq_len,
            "eos_id": eos,
            "dtype": str(dtype),
            "batch_size": spec.encode_batch_size,
        }
        for i, f in enumerate(files)
    ]
    results = _run(executor, pack_file, jobs)
    stats = PackStats()
    for r in results:
        stats.add(PackStats(**{k: r[k] for k in asdict(stats)}))
    n = stats.rows
    if n == 0:
        raise CrucibleError(f"the {stats.documents} input documents hold no text; nothing to shard")
    held = _heldout_rows(n, spec)
    perm = np.random.default_rng(spec.shuffle_seed).permutation(n)
    order = {"heldout": perm[:held], "train": perm[held:]}

    schema = row_schema(spec.seq_len + 1, dtype).append(
        pa.field("row_id", pa.int64(), nullable=False)
    )
    features = hf_layout.features_json(schema)
    meta = hf_layout.with_hf_metadata(schema, features).metadata[b"huggingface"].decode()
    shard_jobs = []
    for split in SPLITS:
        rows = order[split]
        count = -(-len(rows) // spec.rows_per_shard)
        for k in range(count):
            name = hf_layout.shard_name(split, k, count)
            (tmp / split).mkdir(exist_ok=True)
            idx = rows[k * spec.rows_per_shard : (k + 1) * spec.rows_per_shard]
            shard_jobs.append(
                {
                    "packed": packed,
                    "indices": idx.tolist(),
                    "out": str(tmp / name),
                    "file": name,
                    "hf_meta": meta,
                }
            )
    written = {r["file"]: r for r in _run(executor, write_shard, shard_jobs)}

    splits = {}
    for split in SPLITS:
        entries = [
            ShardFile(**{k: written[j["file"]][k] for k in ShardFile.model_fields})
            for j in shard_jobs
            if j["file"].startswith(f"{split}/")
        ]
        splits[split] = Split(
            rows=sum(e.rows for e in entries), tokens=sum(e.tokens for e in entries), shards=entries
        )
        if entries:
            names = [Path(e.file).name for e in entries]
            hf_layout.write_split_metadata(
                tmp / split, names, features, [e.sha256 for e in entries]
            )
    hf_layout.write_dataset_dict(tmp, [s for s in SPLITS if splits[s].rows])
    shutil.rmtree(work)

    manifest = Manifest(
        seq_len=spec.seq_len,
        row_len=spec.seq_len + 1,
        token_dtype=str(dtype),  # type: ignore[arg-type]
        tokenizer=TokenizerInfo(
            file="tokenizer.json",
            fingerprint=tokenizer_fingerprint(tok),
            vocab_size=tok.get_vocab_size(),
            eos_token=spec.tokenizer.eos,
            eos_id=eos,
            sha256=file_sha256(tmp / "tokenizer.json"),
        ),
        spec_hash=spec_hash,
        shard_spec=spec.model_dump(mode="json"),
        shuffle_seed=spec.shuffle_seed,
        sources=[f.name for f in files],
        splits=splits,
        totals=Totals(**asdict(stats), bytes=sum(r["bytes"] for r in written.values())),
        lineage="column doc_ids of every shard: ids of the documents whose tokens a row holds, "
        "in order; column row_id: the row's position in packing order (source files in order)",
    )
    write_manifest(tmp, manifest)  # last: its presence marks the set complete
    return manifest


def _heldout_rows(n: int, spec: ShardSpec) -> int:
    if spec.heldout_rows is not None:
        held = spec.heldout_rows
    else:
        held = round(n * spec.heldout_fraction)
        if spec.heldout_fraction > 0 and n > 1:
            held = max(held, 1)
    if held >= n:
        raise CrucibleError(
            f"the held-out split ({held} rows) leaves no training rows out of {n}; "
            "lower shards.heldout_rows/heldout_fraction or add documents"
        )
    return held


def pack_file(job: dict[str, Any]) -> dict[str, Any]:
    """Encode and pack one input file into an Arrow file of rows (a Ray Data task).

    Args:
        job: ``path``, ``out``, ``tokenizer`` (JSON), ``seq_len``, ``eos_id``, ``dtype``, ``batch_size``.

    Returns:
        The file's :class:`PackStats` as a dict, with ``out``.
    """
    tok = Tokenizer.from_str(job["tokenizer"])
    dtype = pa.type_for_alias(job["dtype"])
    stats = PackStats()
    batches = pq.ParquetFile(job["path"]).iter_batches(
        batch_size=int(job["batch_size"]), columns=["id", "text"]
    )
    docs = ((b.column(0).to_pylist(), b.column(1).to_pylist()) for b in batches)
    schema = row_schema(int(job["seq_len"]) + 1, dtype)
    with pa.OSFile(job["out"], "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for rb in encode_and_pack(tok, docs, int(job["seq_len"]), int(job["eos_id"]), dtype, stats):
            writer.write_batch(rb)
    return {"out": job["out"], **asdict(stats)}


def write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Gather rows ``indices`` (packing order) from the packed files into one shard (a Ray Data task).

    Args:
        job: ``packed`` (files in order), ``indices``, ``out``, ``file``, ``hf_meta``.

    Returns:
        The :class:`ShardFile` fields of the written file.
    """
    tables = [pa.ipc.open_file(pa.memory_map(p)).read_all() for p in job["packed"]]
    indices = pa.array(np.asarray(job["indices"], np.int64))
    rows = pa.concat_tables(tables).take(indices).append_column("row_id", indices)
    rows = rows.replace_schema_metadata({"huggingface": job["hf_meta"]}).combine_chunks()
    out = Path(job["out"])
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)  # IPC stream: the format datasets' save_to_disk writes
    return {
        "file": job["file"],
        "rows": rows.num_rows,
        "tokens": int(pc.sum(rows.column("length")).as_py() or 0),
        "bytes": out.stat().st_size,
        "sha256": file_sha256(out),
    }


def _run(executor: Executor, fn: Callable[[dict], dict], jobs: list[dict]) -> list[dict]:
    """Run ``fn`` over ``jobs`` in-process or as Ray Data tasks; results in job order."""
    if executor == "local" or not jobs:
        return [fn(j) for j in jobs]
    if executor != "ray":
        raise CrucibleError(f"executor {executor!r} is not one of ray, local")
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    items = [{"seq": i, **j} for i, j in enumerate(jobs)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    keys = list(jobs[0])  # the closure carries the key names only, not a job's payload
    out = ds.map(lambda row: {"seq": row["seq"], **fn({k: row[k] for k in keys})}).take_all()
    return [{k: v for k, v in r.items() if k != "seq"} for r in sorted(out, key=lambda r: r["seq"])]
