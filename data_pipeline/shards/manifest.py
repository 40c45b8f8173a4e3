"""The shard set's ``manifest.json``: written last and atomically, verified on every open.

A directory is a shard set only when it holds a manifest; the manifest fixes everything a
trainer relies on: files and their sha256, the split into train and held-out rows, seq_len,
token dtype, the tokenizer fingerprint and the hash of the spec that produced the shards.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from crucible.cluster.storage import Location, describe_error, location
from crucible.config import StrictModel
from crucible.errors import CrucibleError

MANIFEST = "manifest.json"
FORMAT: Literal["crucible-shards/1"] = "crucible-shards/1"
AUTO_SHA256_MAX_BYTES = 2 << 30  # verify="auto" hashes sets up to 2 GiB, else checks sizes


class ShardFile(StrictModel):
    """One Arrow shard file."""

    file: str = Field(description="Path relative to the shard directory.")
    rows: int = Field(description="Rows (samples) in the file.")
    tokens: int = Field(description="Real (non-padding) tokens in the file.")
    bytes: int = Field(description="File size in bytes.")
    sha256: str = Field(description="sha256 of the file's bytes.")


class Split(StrictModel):
    """The rows of one split, in storage order across its shard files."""

    rows: int = Field(description="Rows in the split.")
    tokens: int = Field(description="Real tokens in the split.")
    shards: list[ShardFile] = Field(
        description="Shard files in order; global index runs across them."
    )


class TokenizerInfo(StrictModel):
    """The tokenizer every row was encoded with."""

    file: str = Field(description="tokenizer.json, relative to the shard directory.")
    fingerprint: str = Field(description="sha256 of the canonical tokenizer.json.")
    vocab_size: int = Field(description="Number of token ids.")
    eos_token: str = Field(description="Document separator (also pads the last row of a stream).")
    eos_id: int = Field(description="Id of eos_token.")
    sha256: str = Field(description="sha256 of the stored tokenizer.json file.")


class Totals(StrictModel):
    """Counts over the whole build."""

    documents: int = Field(description="Input documents read.")
    empty_documents: int = Field(description="Documents skipped because they encode to no tokens.")
    document_tokens: int = Field(description="Tokens of all documents, one EOS each included.")
    rows: int = Field(description="Packed rows (train + held-out).")
    padding_tokens: int = Field(description="EOS padding in the last row of each packing stream.")
    bytes: int = Field(description="Bytes of all shard files.")
    too_long: int = Field(0, description="Chat: conversations longer than a row, dropped.")
    untrained: int = Field(0, description="Chat: conversations with no assistant turn left.")
    target_tokens: int = Field(0, description="Chat: tokens trained on (loss mask 1).")


class Manifest(StrictModel):
    """Everything a reader needs to trust and interpret a shard set."""

    format: Literal["crucible-shards/1"] = Field(FORMAT, description="Manifest format version.")
    seq_len: int = Field(description="Model context; rows hold seq_len + 1 tokens.")
    row_len: int = Field(description="Tokens per row (seq_len + 1).")
    token_dtype: Literal["uint16", "uint32"] = Field(description="Storage type of token ids.")
    tokenizer: TokenizerInfo = Field(description="The tokenizer of every row.")
    spec_hash: str = Field(description="Hash of the pipeline spec that produced these shards.")
    shard_spec: dict[str, Any] = Field(description="The resolved shard spec.")
    shuffle_seed: int = Field(description="Seed of the row permutation applied at build time.")
    sources: list[str] = Field(description="Input document files in packing order.")
    splits: dict[str, Split] = Field(
        description="'train' and 'heldout' rows; fixed by this manifest."
    )
    totals: Totals = Field(description="Counts over the whole build.")
    lineage: str = Field(description="Where row → document lineage lives.")
    chat_template: str | None = Field(
        None,
        description="Chat shards: the template of the conversations; rows hold whole "
        "examples and a loss_mask column (1 on training targets).",
    )
    comparisons: bool = Field(
        False,
        description="Comparison shards (reward-model data): each row holds whole groups of "
        "ranked answers; loss_mask is the answer's rank + 1 at its last token, else 0.",
    )

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical manifest: changes whenever any shard or setting changes."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def split(self, name: str) -> Split:
        """The split called ``name`` (``train`` or ``heldout``), with a clear error otherwise."""
        if name not in self.splits:
            raise CrucibleError(
                f"no split {name!r} in these shards; choose one of {sorted(self.splits)}"
            )
        return self.splits[name]


def write_manifest(shards_dir: Location, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically (one object; temp file + fsync + rename on local
    disks): the last write of a build.

    Args:
        shards_dir: The shard directory.
        manifest: The manifest.
    """
    (shards_dir / MANIFEST).write_text(manifest.model_dump_json(indent=2))


def read_manifest(shards_dir: str | Location) -> Manifest:
    """Read and validate ``manifest.json``.

    Args:
        shards_dir: The shard directory (path or URI).
    """
    d = location(shards_dir)
    p = d / MANIFEST
    try:
        text = p.read_text()
    except FileNotFoundError:
        if not d.is_dir():
            raise CrucibleError(
                f"shard directory {d} does not exist; build shards with `crucible data run`"
            ) from None
        raise CrucibleError(
            f"{d} is not a shard set: it has no {MANIFEST} (a build that did not finish); "
            "rerun `crucible data run`"
        ) from None
    except OSError as e:
        raise CrucibleError(describe_error(p, e)) from None
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise CrucibleError(
            f"{p} is not a valid shard manifest ({where}: {first['msg']}); rebuild the shards"
        ) from None


def resolve_verify(mode: str, manifest: Manifest) -> Literal["size", "sha256"]:
    """``auto`` becomes ``sha256`` for sets up to 2 GiB, else ``size``.

    Args:
        mode: ``size``, ``sha256`` or ``auto``.
        manifest: The manifest (for the total size).
    """
    if mode == "auto":
        return "sha256" if manifest.totals.bytes <= AUTO_SHA256_MAX_BYTES else "size"
    if mode not in ("size", "sha256"):
        raise CrucibleError(f"verify={mode!r} is not one of size, sha256, auto")
    return mode  # type: ignore[return-value]


def shard_problems(shards_dir: str | Location, manifest: Manifest, mode: str = "auto") -> list[str]:
    """Every shard (and the tokenizer file) that is missing, truncated or corrupted.

    Args:
        shards_dir: The shard directory.
        manifest: Its manifest.
        mode: ``size``, ``sha256`` or ``auto`` (see :func:`resolve_verify`).

    Returns:
        One line per bad file, naming it; empty when all files check out.
    """
    d = location(shards_dir)
    how = resolve_verify(mode, manifest)
    tok = manifest.tokenizer
    files: list[tuple[str, int | None, str]] = [
        (s.file, s.bytes, s.sha256) for sp in manifest.splits.values() for s in sp.shards
    ]
    files.append((tok.file, None, tok.sha256))
    present = d.walk()
    problems = []
    for name, size, digest in files:
        p = d / name
        if name not in present:
            problems.append(f"{p} is missing")
            continue
        actual = present[name]
        if size is not None and actual != size:
            kind = "truncated" if actual < size else "has extra bytes"
            problems.append(f"{p} {kind}: {actual} bytes, the manifest says {size}")
        elif how == "sha256" or size is None:
            got = p.sha256()
            if got != digest:
                problems.append(
                    f"{p} is corrupted: sha256 {got[:16]}…, the manifest says {digest[:16]}…"
                )
    return problems


def verify_shards(shards_dir: str | Location, manifest: Manifest, mode: str = "auto") -> None:
    """Raise :class:`CrucibleError` naming the first bad shard (see :func:`shard_problems`).

    Args:
        shards_dir: The shard directory.
        manifest: Its manifest.
        mode: ``size``, ``sha256`` or ``auto``.
    """
    problems = shard_problems(shards_dir, manifest, mode)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CrucibleError(f"{problems[0]}{more}; rebuild the shards with `crucible data run`")


def check_tokenizer(manifest: Manifest, fingerprint: str, shards_dir: str | Location = "") -> None:
    """Refuse shards encoded with another tokenizer, showing both fingerprints.

    Args:
        manifest: The shards' manifest.
        fingerprint: The fingerprint of the tokenizer this run uses.
        shards_dir: For the message.
    """
    if manifest.tokenizer.fingerprint != fingerprint:
        raise CrucibleError(
            f"shards {shards_dir} were encoded with tokenizer {manifest.tokenizer.fingerprint}, "
            f"but this run uses tokenizer {fingerprint}; rebuild the shards with this tokenizer "
            "or train with theirs"
        )
