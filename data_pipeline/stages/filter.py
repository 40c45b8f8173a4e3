"""The filter stage: each input part through the step chain (read -> normalise -> language ->
quality -> PII), its survivors written with their dedup columns (exact-text hash, MinHash band
keys, compact signature), one task per part.

A part is one input file. Its outputs are written atomically and a JSON marker last, so a
rerun skips finished parts and redoes unfinished ones from scratch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from crucible.cluster.storage import Location, location
from crucible.data_pipeline.dedup.exact import text_hash
from crucible.data_pipeline.dedup.lsh import compact_signature
from crucible.data_pipeline.dedup.minhash import band_keys, signature
from crucible.data_pipeline.document import InputFile
from crucible.data_pipeline.document_step import PipelineStep, Step
from crucible.data_pipeline.filters.c4 import C4
from crucible.data_pipeline.filters.fineweb import FineWeb
from crucible.data_pipeline.filters.gopher_quality import GopherQuality
from crucible.data_pipeline.filters.gopher_repetition import GopherRepetition
from crucible.data_pipeline.filters.language import LanguageFilter
from crucible.data_pipeline.normalize import Normalize
from crucible.data_pipeline.pii import PII
from crucible.data_pipeline.readers.read import Reader
from crucible.data_pipeline.run_dir import marker_name, part_name, work_paths
from crucible.data_pipeline.spec import DataSpec
from crucible.data_pipeline.stages.parts import PartStage
from crucible.data_pipeline.writers.parquet import (
    EXCLUSION_SCHEMA,
    FILTERED_SCHEMA,
    AtomicParquetWriter,
    exclusions_table,
    filtered_table,
)


def build_steps(spec: DataSpec) -> list[Step]:
    """The document steps in order (FineWeb's order: language, repetition, quality, C4,
    FineWeb; PII last, so rules see the original text)."""
    configured: list[tuple[Any, Callable[[Any], Step]]] = [
        (spec.normalize, Normalize),
        (spec.language, LanguageFilter),
        (spec.gopher_repetition, GopherRepetition),
        (spec.gopher_quality, GopherQuality),
        (spec.c4, C4),
        (spec.fineweb, FineWeb),
        (spec.pii, PII),
    ]
    steps = [make(cfg) for cfg, make in configured if cfg.enabled]
    return steps


def filter_part(part: int, path: str, spec: DataSpec, run_dir: Location) -> dict[str, Any]:
    """Read input ``path`` as part ``part`` through every step; write the survivors (with their
    text hash, band keys and compact signature), the exclusions and the part's stats (the marker, last).

    Args:
        part: index of the input in the sorted input list.
        path: the input file.
        spec: the data spec.
        run_dir: the run directory.
    """
    p = work_paths(run_dir)
    name = part_name(part)
    chain: list[PipelineStep] = [Reader(spec.reader), *build_steps(spec)]
    docs: Iterable[Any] = [InputFile(part, path)]
    for step in chain:
        docs = step.run(docs)
    mh = spec.dedup.minhash
    out = AtomicParquetWriter(p["filtered"] / name, FILTERED_SCHEMA)
    exc = AtomicParquetWriter(p["excluded"] / name, EXCLUSION_SCHEMA)
    keep_text, max_chars = spec.output.exclusion_text, spec.output.max_exclusion_text_chars

    def flush(batch: list, hashes: list, sigs: list) -> None:
        bands: list = [[] for _ in batch]
        compact: list = [[] for _ in batch]
        if mh.enabled and batch:  # one pass over the batch's signatures
            bands = band_keys(np.stack(sigs), mh).tolist()
            compact = compact_signature(np.stack(sigs)).tolist()
        out.write(filtered_table(batch, hashes, bands, compact))
        for h in chain:
            if h.exclusions:
                exc.write(exclusions_table(h.exclusions, keep_text, max_chars))
                h.exclusions.clear()

    batch: list = []
    hashes: list = []
    sigs: list = []
    for doc in docs:
        batch.append(doc)
        hashes.append(text_hash(doc.text))
        if mh.enabled:
            sigs.append(signature(doc.text, mh))
        if len(batch) >= spec.reader.batch_size:
            flush(batch, hashes, sigs)
            batch, hashes, sigs = [], [], []
    flush(batch, hashes, sigs)
    out.commit()
    exc.commit()
    stats = {h.name: h.stats.to_dict() for h in chain}
    (p["filter_done"] / marker_name(part)).write_json(stats)
    return stats


def filter_task(item: dict[str, Any], spec_json: str, run_dir: str) -> dict[str, Any]:
    """:func:`filter_part` as a task: ``item`` holds ``part`` and ``path``."""
    spec = DataSpec.model_validate_json(spec_json)
    return filter_part(int(item["part"]), str(item["path"]), spec, location(run_dir))


def filter_stage(
    spec: DataSpec,
    run_dir: Location,
    inputs: list[str],
    progress: bool = False,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> PartStage:
    """The filter stage over every input file.

    Args:
        spec: the data spec.
        run_dir: the run directory.
        inputs: the input files, sorted (part ``i`` is ``inputs[i]``).
        progress: show a progress bar.
        on_part: called with the stats so far after each part.
    """
    task = functools.partial(filter_task, spec_json=spec.model_dump_json(), run_dir=run_dir.uri)
    return PartStage(
        "filter",
        [{"part": i, "path": path} for i, path in enumerate(inputs)],
        task,
        work_paths(run_dir)["filter_done"],
        progress=progress,
        on_part=on_part,
    )
