"""Lay shards out as a Hugging Face ``DatasetDict`` on disk, so ``datasets.load_from_disk`` opens them.

``Dataset.save_to_disk`` writes, per split, Arrow IPC *stream* files named
``data-XXXXX-of-YYYYY.arrow`` (schema metadata ``huggingface`` holds the features),
``dataset_info.json`` (the features) and ``state.json`` (the file list); the top level has
``dataset_dict.json`` listing the splits. We write the same files ourselves, streaming, and let
``datasets`` itself translate the Arrow schema into its features so the layout follows the
installed version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from crucible.cluster.storage import Location


def shard_name(split: str, index: int, count: int) -> str:
    """Relative path of a split's ``index``-th of ``count`` shard files.

    Args:
        split: ``train`` or ``heldout``.
        index: Shard number.
        count: Shards in the split.
    """
    return f"{split}/data-{index:05d}-of-{count:05d}.arrow"


def features_json(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features of ``schema``, as ``dataset_info.json`` stores them.

    Args:
        schema: The shard schema.
    """
    import datasets  # heavy import: only when writing a shard set

    return datasets.Features.from_arrow_schema(schema).to_dict()


def with_hf_metadata(schema: pa.Schema, features: dict) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata ``save_to_disk`` puts in every Arrow file.

    Args:
        schema: The shard schema.
        features: From :func:`features_json`.
    """
    meta = json.dumps({"info": {"features": features}})
    return schema.with_metadata({"huggingface": meta})


def write_split_metadata(
    split_dir: Location, files: list[str], features: dict, digests: list[str]
) -> None:
    """Write ``dataset_info.json`` and ``state.json`` for one split.

    Args:
        split_dir: The split's directory.
        files: Its shard file names (basenames), in order.
        features: From :func:`features_json`.
        digests: The files' sha256, for a stable dataset fingerprint.
    """
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (split_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
    state: dict[str, object] = {
        "_data_files": [{"filename": f} for f in files],
        "_fingerprint": hashlib.sha256("".join(digests).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (split_dir / "state.json").write_text(json.dumps(state, indent=2))


def write_dataset_dict(shards_dir: Location, splits: list[str]) -> None:
    """Write the top-level ``dataset_dict.json``.

    Args:
        shards_dir: The shard directory.
        splits: Non-empty splits.
    """
    (shards_dir / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
