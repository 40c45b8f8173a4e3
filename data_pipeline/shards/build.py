"""Clean documents → tokenizer → packed rows → shuffled, checksummed Arrow shards + manifest.

Steps, each deterministic, run through the executor contract
(:mod:`crucible.data_pipeline.executors.base`) on the executor the caller gives:
(1) train or load the tokenizer and save it as ``tokenizer.json`` in the shard set; (2) encode
and pack every input file on its own (one packing stream per file, in file order), one task
per file, each loading the tokenizer from that file's path; (3) shuffle: every packed row
``g`` (its position in packing order) goes to position ``perm(g)`` of a stateless keyed
permutation (:class:`~crucible.data_pipeline.permutation.FeistelPermutation`), the first
positions forming the held-out split; rows are routed to their shard by a hash-partitioned
map-reduce, and each reduce writes whole shard files; (4) the Hugging Face metadata and,
last, ``manifest.json``.

Files are written straight into ``out_dir`` (no directory rename, so object stores take the
same path): a shard set is complete exactly when its manifest exists, and a build finding a
directory without one clears it first (the leftovers of an interrupted build).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crucible.cluster.storage import Location, location, sha256_file
from crucible.data_pipeline.executors.base import Executor, Stage
from crucible.data_pipeline.permutation import FeistelPermutation
from crucible.data_pipeline.shards import hf_layout
from crucible.data_pipeline.shards.manifest import (
    MANIFEST,
    Manifest,
    ShardFile,
    Split,
    TokenizerInfo,
    Totals,
    read_manifest,
    shard_problems,
    write_manifest,
)
from crucible.data_pipeline.shards.pack_task import pack_file, shard_schema
from crucible.data_pipeline.shards.spec import ShardSpec
from crucible.data_pipeline.tokens.pack import PackStats, token_dtype
from crucible.data_pipeline.tokens.tokenizer import (
    build_tokenizer,
    canonical_json,
    eos_id,
    tokenizer_fingerprint,
)
from crucible.errors import CrucibleError

SPLITS = ("train", "heldout")
TOKENIZER = "tokenizer.json"


class ShardStage(Stage):
    """The shard build (:func:`build_shards`) as the pipeline's last stage."""

    name = "shards"

    def __init__(
        self,
        documents_dir: Location,
        spec: ShardSpec,
        out_dir: Location,
        spec_hash: str,
        chat_template: str | None = None,
        comparisons: bool = False,
    ) -> None:
        self.documents_dir = documents_dir
        self.spec = spec
        self.out_dir = out_dir
        self.rows: dict[str, Any] = {"spec_hash": spec_hash, "chat_template": chat_template,
                                     "comparisons": comparisons}  # fmt: skip

    def run(self, ex: Executor) -> dict[str, Any]:
        """Build (or keep) the shard set; its manifest's totals."""
        m = build_shards(self.documents_dir, self.spec, self.out_dir, ex, **self.rows)
        return m.totals.model_dump()


def build_shards(
    documents_dir: Location | str,
    spec: ShardSpec,
    out_dir: Location | str,
    executor: Executor,
    spec_hash: str = "",
    chat_template: str | None = None,
    comparisons: bool = False,
) -> Manifest:
    """Build the training shard set of ``documents_dir`` in ``out_dir``.

    A finished shard set with the same ``spec_hash`` is kept and returned (reruns skip it).

    Args:
        documents_dir: Clean documents: ``part-*.parquet`` (columns ``id``, ``text``) and
            ``_SUCCESS``.
        spec: The shard spec.
        out_dir: The shard directory to create (e.g. ``<run_dir>/shards``).
        executor: A data executor (in-process or Ray): every task and the shuffle run on it.
        spec_hash: Hash of the producing pipeline spec, recorded in the manifest.
        chat_template: The documents are conversations rendered with this template
            (:mod:`crucible.data_pipeline.chat`): pack whole examples with a loss mask.
        comparisons: The conversations are comparisons (ranked answers to one prompt): each
            packed whole, its mask holding each answer's rank at its last token.

    Returns:
        The manifest of the shard set.
    """
    out = location(out_dir)
    files = document_files(location(documents_dir))
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.spec_hash != spec_hash:
            raise CrucibleError(
                f"{out} holds shards of another spec (hash {old.spec_hash[:12]}, this one "
                f"{spec_hash[:12]}); move it away or use another run directory"
            )
        if not shard_problems(out, old, "size"):
            return old
        (out / MANIFEST).rm()  # a damaged set of this very spec: rebuilt below
    out.rmtree()  # an interrupted build's files (no manifest): not worth keeping
    try:
        return _build(files, spec, out, executor, spec_hash, chat_template, comparisons)
    except BaseException:
        out.rmtree()
        raise


def document_files(documents_dir: Location) -> list[Location]:
    """The complete input files, sorted; errors when the documents step did not finish.

    Args:
        documents_dir: ``<run_dir>/documents``.
    """
    if not documents_dir.is_dir():
        raise CrucibleError(
            f"documents directory {documents_dir} does not exist; run the data pipeline first"
        )
    names = documents_dir.ls()
    if not {"_SUCCESS", "manifest.json", "_manifest.json"} & set(names):
        raise CrucibleError(
            f"{documents_dir} has no _SUCCESS marker: the documents step did not finish; rerun it"
        )
    files = documents_dir.glob("part-*.parquet")
    if not files:
        raise CrucibleError(f"{documents_dir} has no part-*.parquet files; nothing to tokenize")
    for f in files:
        missing = [c for c in ("id", "text") if c not in pq.read_schema(f.open_read()).names]
        if missing:
            raise CrucibleError(
                f"{f} lacks column(s) {', '.join(missing)}; it is not a clean-documents file"
            )
    return files


def _texts(files: list[Location]) -> Iterator[str]:
    for f in files:
        for b in pq.ParquetFile(f.open_read()).iter_batches(batch_size=1024, columns=["text"]):
            yield from (t for t in b.column(0).to_pylist() if t)


def _build(
    files: list[Location],
    spec: ShardSpec,
    out: Location,
    executor: Executor,
    spec_hash: str,
    chat_template: str | None,
    comparisons: bool,
) -> Manifest:
    tok = build_tokenizer(spec.tokenizer, _texts(files))
    tok_json = canonical_json(tok)
    (out / TOKENIZER).write_text(tok_json)
    eos = eos_id(tok, spec.tokenizer.eos)
    dtype = token_dtype(tok.get_vocab_size(), spec.token_dtype)
    work = out / "_work"

    packed = [work / f"packed-{i:05d}.arrow" for i in range(len(files))]
    jobs = [
        {
            "path": f.uri,
            "out": packed[i].uri,
            "tokenizer": (out / TOKENIZER).uri,
            "seq_len": spec.seq_len,
            "eos_id": eos,
            "dtype": str(dtype),
            "batch_size": spec.encode_batch_size,
            "chat_template": chat_template,
            "comparisons": comparisons,
        }
        for i, f in enumerate(files)
    ]
    results = [r for _, r in sorted(executor.run_tasks(jobs, pack_file), key=lambda t: t[0])]
    stats = PackStats()
    for r in results:
        stats.add(PackStats(**{k: int(r[k]) for k in asdict(stats)}))
    n = stats.rows
    if stats.too_long or stats.untrained:
        print(
            f"warning: {stats.too_long} conversation(s) longer than a row of {spec.seq_len + 1} "
            f"tokens and {stats.untrained} with no assistant turn left were not packed; raise "
            "shards.seq_len or shorten them",
            flush=True,
        )
    if n == 0:
        raise CrucibleError(f"the {stats.documents} input documents hold no text; nothing to shard")
    held = _heldout_rows(n, spec)
    counts = {
        "heldout": -(-held // spec.rows_per_shard),
        "train": -(-(n - held) // spec.rows_per_shard),
    }
    names = [
        hf_layout.shard_name(s, k, counts[s])
        for s in ("heldout", "train")
        for k in range(counts[s])
    ]
    schema = shard_schema(spec.seq_len + 1, dtype, chat_template).append(
        pa.field("row_id", pa.int64(), nullable=False)
    )
    features = hf_layout.features_json(schema)
    meta = hf_layout.with_hf_metadata(schema, features).metadata[b"huggingface"].decode()
    offsets = np.concatenate([[0], np.cumsum([int(r["rows"]) for r in results])])
    route = [
        {
            "packed": packed[i].uri,
            "offset": int(offsets[i]),
            "rows": n,
            "heldout": held,
            "seed": spec.shuffle_seed,
            "rows_per_shard": spec.rows_per_shard,
            "heldout_shards": counts["heldout"],
        }
        for i in range(len(files))
    ]
    write = functools.partial(write_shards, out=out.uri, names=tuple(names), hf_meta=meta)
    rows = executor.from_tasks(route, route_rows)
    # the packed rows (their Arrow files' sizes), plus row id, shard and position
    nbytes = sum(p.size() for p in packed) + n * 3 * 8
    shards = executor.shuffle(
        rows, ["shard"], write, nbytes=nbytes, partitions=len(names), batch_format="pyarrow"
    )
    written = {str(r["file"]): r for r in executor.take_all(shards)}
    if sorted(written) != sorted(names):
        raise CrucibleError(f"shard build wrote {len(written)} of {len(names)} shard files")

    splits = {}
    for split in SPLITS:
        entries = [
            ShardFile(
                file=name,
                rows=int(written[name]["rows"]),
                tokens=int(written[name]["tokens"]),
                bytes=int(written[name]["bytes"]),
                sha256=str(written[name]["sha256"]),
            )
            for name in names
            if name.startswith(f"{split}/")
        ]
        splits[split] = Split(
            rows=sum(e.rows for e in entries), tokens=sum(e.tokens for e in entries), shards=entries
        )
        if entries:
            hf_layout.write_split_metadata(
                out / split,
                [e.file.rsplit("/", 1)[-1] for e in entries],
                features,
                [e.sha256 for e in entries],
            )
    hf_layout.write_dataset_dict(out, [s for s in SPLITS if splits[s].rows])
    work.rmtree()

    manifest = Manifest(
        seq_len=spec.seq_len,
        row_len=spec.seq_len + 1,
        token_dtype=str(dtype),  # type: ignore[arg-type]
        tokenizer=TokenizerInfo(
            file=TOKENIZER,
            fingerprint=tokenizer_fingerprint(tok),
            vocab_size=tok.get_vocab_size(),
            eos_token=spec.tokenizer.eos,
            eos_id=eos,
            sha256=hashlib.sha256(tok_json.encode()).hexdigest(),
        ),
        spec_hash=spec_hash,
        shard_spec=spec.model_dump(mode="json"),
        shuffle_seed=spec.shuffle_seed,
        sources=[f.name for f in files],
        splits=splits,
        totals=Totals(**asdict(stats), bytes=sum(int(r["bytes"]) for r in written.values())),
        lineage="column doc_ids of every shard: ids of the documents whose tokens a row holds, "
        "in order; column row_id: the row's position in packing order (source files in order)",
        chat_template=chat_template,
        comparisons=comparisons,
    )
    write_manifest(out, manifest)  # last: its presence marks the set complete
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


def route_rows(job: dict[str, Any]) -> pa.Table:
    """The rows of one packed file, each with the shard it goes to and its position there
    (the map side of the shuffle).

    Global row ``g`` (packing order) takes position ``p = perm(g)``; positions below
    ``heldout`` are the held-out split, the rest the training split, each cut into shards of
    ``rows_per_shard`` rows (held-out shards numbered first).

    Args:
        job: ``packed`` (URI), ``offset`` (its first row's global index), ``rows`` (all rows
            of the build), ``heldout``, ``seed``, ``rows_per_shard``, ``heldout_shards``.
    """
    table = pa.ipc.open_file(location(str(job["packed"])).open_read()).read_all()
    g = np.arange(table.num_rows, dtype=np.int64) + int(job["offset"])
    p = FeistelPermutation(int(job["rows"]), int(job["seed"]), 0)(g)
    held, per = int(job["heldout"]), int(job["rows_per_shard"])
    in_held = p < held
    shard = np.where(in_held, p // per, int(job["heldout_shards"]) + (p - held) // per)
    return (
        table.append_column("row_id", pa.array(g))
        .append_column("shard", pa.array(shard.astype(np.int64)))
        .append_column("pos", pa.array(p.astype(np.int64)))
    )


def write_shards(rows: pa.Table, out: str, names: tuple[str, ...], hf_meta: str) -> pa.Table:
    """Write every shard whose rows are all in ``rows`` (the reduce side of the shuffle).

    Args:
        rows: whole shards' rows from :func:`route_rows`, in any order.
        out: the shard set's URI.
        names: shard file names (relative paths) by shard number.
        hf_meta: the Arrow schema's ``huggingface`` metadata.

    Returns:
        One row per shard written: ``file``, ``rows``, ``tokens``, ``bytes``, ``sha256``.
    """
    result: dict[str, list[Any]] = {k: [] for k in ("file", "rows", "tokens", "bytes", "sha256")}
    if rows.num_rows:
        rows = rows.sort_by([("shard", "ascending"), ("pos", "ascending")])
        shard = rows.column("shard").to_numpy()
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip(
            np.concatenate([[0], bounds]), np.concatenate([bounds, [len(shard)]]), strict=True
        ):
            name = names[int(shard[lo])]
            # take, not slice: fresh zero-offset buffers, so a shard's bytes do not depend
            # on where its rows sat in the batch this reduce was handed
            part = rows.take(pa.array(np.arange(lo, hi))).drop_columns(["shard", "pos"])
            part = part.replace_schema_metadata({"huggingface": hf_meta}).combine_chunks()
            info = _write_stream(location(out) / name, part)
            result["file"].append(name)
            result["rows"].append(part.num_rows)
            result["tokens"].append(int(pc.sum(part.column("length")).as_py() or 0))
            result["bytes"].append(info["bytes"])
            result["sha256"].append(info["sha256"])
    return pa.table(
        result,
        schema=pa.schema(
            [("file", pa.string()), ("rows", pa.int64()), ("tokens", pa.int64()),
             ("bytes", pa.int64()), ("sha256", pa.string())]
        ),
    )  # fmt: skip


def _write_stream(loc: Location, table: pa.Table) -> dict[str, Any]:
    """``table`` as an Arrow IPC stream file (the format ``save_to_disk`` writes) at ``loc``;
    its sha256 and size."""
    with loc.writing() as pending:
        with (
            pa.OSFile(str(pending.path), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
        digest = sha256_file(pending.path)
        size = pending.path.stat().st_size
    return {"sha256": digest, "bytes": size}
