"""The training reader: memory-mapped shards, a global sample order that is a pure function of
(seed, epoch, number of samples), and per-rank slices of every global batch.

Samples form one endless stream: stream position ``p`` is sample ``perm(seed, p // N)(p % N)``
of the split (``N`` samples), where ``perm`` is a stateless keyed bijection of ``[0, N)``
(:class:`~crucible.data_pipeline.permutation.FeistelPermutation`): nothing grows with ``N``.
Global batch ``b`` is stream positions ``[b·G, (b+1)·G)``; data-parallel rank ``r`` of ``W``
takes the contiguous slice ``[b·G + r·G/W, b·G + (r+1)·G/W)``. So the reader's whole state is
the number of samples consumed, and the global batches are the same for any ``W`` that
divides ``G``. Global batches can be skipped (a rollback after a loss spike skips the batches
that caused it): the reader steps over them, their samples counted as consumed; which ones is
the run's to record (its spec and rollback log), not the reader's state.

Shards are memory-mapped where they are, on a local or shared filesystem; from an object
store each node first copies the split it reads into node-local scratch (once per node, each
file checked against its sha256 on the way).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from crucible.cluster.storage import Location, cache_key, location, scratch_dir
from crucible.data_pipeline.permutation import FeistelPermutation
from crucible.data_pipeline.shards.manifest import (
    Manifest,
    check_tokenizer,
    read_manifest,
    verify_shards,
)
from crucible.data_pipeline.shards.split_view import SplitView
from crucible.errors import CrucibleError

if TYPE_CHECKING:
    from crucible.data_pipeline.tokens.masking import MaskedLMBatcher

IGNORE_INDEX = -100  # label value torch's cross_entropy skips (padding, held-out filler)


class MaskingOptions(Protocol):
    """How rows become masked-LM samples (a train spec's ``objective`` section has these)."""

    mask_prob: float
    mask_token_prob: float
    random_token_prob: float
    whole_word: bool
    nsp: bool


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_samples: int) -> FeistelPermutation:
    """The order of the samples in ``epoch``: a pure function of its arguments, computed per
    index (``epoch_order(...)(positions)`` gives the samples at those positions).

    Args:
        seed: Reader seed.
        epoch: Epoch number.
        num_samples: Samples in the split.
    """
    return FeistelPermutation(num_samples, seed, epoch)


def local_shards(
    shards: Location, manifest: Manifest, splits: tuple[str, ...] = ("train", "heldout")
) -> Path:
    """A local directory holding the shard files of ``splits``, to memory-map.

    On a local (or mounted) filesystem that is the shard set itself. From an object store the
    files are copied into node-local scratch, keyed by the manifest's fingerprint: the ranks
    of a node share one copy (a file lock makes the first one fetch it), every file is
    checked against its size and sha256 as it arrives, and a file is only ever present whole.

    Args:
        shards: The shard set.
        manifest: Its manifest.
        splits: The splits to have locally.
    """
    if shards.is_local:
        return shards.local_path
    from filelock import FileLock

    cache = scratch_dir("shards", cache_key(shards.uri + manifest.fingerprint))
    wanted: list[tuple[str, int | None, str]] = [
        (manifest.tokenizer.file, None, manifest.tokenizer.sha256)
    ]
    for name in splits:
        if name in manifest.splits:
            wanted += [(f.file, f.bytes, f.sha256) for f in manifest.splits[name].shards]
    with FileLock(str(cache / ".lock")):
        for rel, size, digest in wanted:
            if not (cache / rel).is_file():  # present means checked: downloads are atomic
                try:
                    (shards / rel).download(cache / rel, digest, size)
                except CrucibleError as e:
                    raise CrucibleError(
                        f"{e}; rebuild the shards with `crucible data run`"
                    ) from None
    return cache


class TrainingReader:
    """Deterministic, resumable, world-size-independent batches of one shard split."""

    def __init__(
        self,
        shards_dir: str | Location,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        verify: str = "auto",
        allow_manifest_change: bool = False,
        tokenizer_fingerprint: str | None = None,
        doc_index: bool = True,
        mlm: MaskingOptions | None = None,
    ) -> None:
        """Open, verify and map a shard set.

        Args:
            shards_dir: Directory holding ``manifest.json`` (a path or URI).
            global_batch_size: Samples per optimizer step over all data-parallel ranks.
            rank: This data-parallel rank.
            world_size: Number of data-parallel ranks; must divide ``global_batch_size``.
            seed: Seed of the per-epoch sample order.
            split: ``train`` or ``heldout``.
            verify: ``size``, ``sha256`` or ``auto`` (sha256 for sets up to 2 GiB).
            allow_manifest_change: Resume onto a different shard set without an error.
            tokenizer_fingerprint: When given, shards of any other tokenizer are refused.
            doc_index: Also return ``doc_index`` (for attention masking across documents).
            mlm: Return masked-LM samples (BERT) instead of next-token ones: see
                :class:`~crucible.data_pipeline.tokens.masking.MaskedLMBatcher`, whose draws
                are seeded by ``seed``, each sample's index and the epoch it is read in.
        """
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise CrucibleError(
                f"global batch size {global_batch_size} is not a positive multiple of the "
                f"data-parallel size {world_size}; make it one"
            )
        if not 0 <= rank < world_size:
            raise CrucibleError(f"rank {rank} is outside 0..{world_size - 1}")
        self.shards_dir = location(shards_dir)
        self.manifest = read_manifest(self.shards_dir)
        if tokenizer_fingerprint is not None:
            check_tokenizer(self.manifest, tokenizer_fingerprint, self.shards_dir)
        if self.shards_dir.is_local:
            verify_shards(self.shards_dir, self.manifest, verify)
        # from an object store, every file is checked against its sha256 as it is fetched
        local = local_shards(self.shards_dir, self.manifest, (split,))
        self.view = SplitView(local, self.manifest, split)
        if self.view.num_samples == 0:
            raise CrucibleError(f"split {split!r} of {self.shards_dir} is empty")
        self.split = split
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.allow_manifest_change = allow_manifest_change
        self.doc_index = doc_index
        self.samples_consumed = 0
        self.masking = None if mlm is None else self._masking(local, mlm)
        self.skipped: set[int] = set()
        """Global batches :meth:`next_batch` steps over (see :meth:`skip`)."""

    def _masking(self, local: Path, mlm: MaskingOptions) -> MaskedLMBatcher:
        from crucible.data_pipeline.tokens.masking import MaskedLMBatcher
        from crucible.data_pipeline.tokens.tokenizer import (
            bert_special_ids,
            continuation_mask,
            load_tokenizer,
        )

        tok = load_tokenizer(location(local / self.manifest.tokenizer.file))
        return MaskedLMBatcher(
            special=bert_special_ids(tok),
            vocab_size=tok.get_vocab_size(),
            seed=self.seed,
            mask_prob=mlm.mask_prob,
            mask_token_prob=mlm.mask_token_prob,
            random_token_prob=mlm.random_token_prob,
            whole_word=continuation_mask(tok) if mlm.whole_word else None,
            nsp=mlm.nsp,
            donor=self.view.rows,
            num_samples=self.view.num_samples,
        )

    @property
    def num_samples(self) -> int:
        """Samples in the split (one epoch)."""
        return self.view.num_samples

    @property
    def seq_len(self) -> int:
        """Model context: inputs and labels have this length."""
        return self.manifest.seq_len

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from."""
        return self.samples_consumed // self.num_samples

    @property
    def manifest_fingerprint(self) -> str:
        """Fingerprint of the shard set being read."""
        return self.manifest.fingerprint

    def stream_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at stream positions ``[start, start + count)``, across epochs.

        Args:
            start: First stream position.
            count: Number of positions.
        """
        pos = np.arange(start, start + count, dtype=np.int64)
        out = np.empty(count, np.int64)
        n = self.num_samples
        for e in np.unique(pos // n):
            sel = pos // n == e
            out[sel] = epoch_order(self.seed, int(e), n)(pos[sel] % n)
        return out

    def global_batch_indices(self, batch: int) -> np.ndarray:
        """Sample indices of global batch ``batch`` (all ranks, in rank order).

        Args:
            batch: Global batch number since the start of training.
        """
        return self.stream_indices(batch * self.global_batch_size, self.global_batch_size)

    def skip(self, batches: Iterable[int]) -> None:
        """Step over global batches ``batches`` from now on (those already read stay read).

        Args:
            batches: Global batch numbers since the start of training.
        """
        self.skipped.update(int(b) for b in batches)

    @property
    def last_batch(self) -> int:
        """The global batch :meth:`next_batch` returned last (-1 before any)."""
        return self.samples_consumed // self.global_batch_size - 1

    def next_batch(self) -> dict[str, Any]:
        """This rank's slice of the next global batch not skipped, as torch tensors; advances
        the state.

        Returns:
            ``input_ids`` and ``labels`` (B, seq_len) int64 (labels shifted by one, ``-100``
            on padding), ``doc_index`` (B, seq_len) int32 (document number within the row, -1
            on padding: mask attention where it differs; absent when ``doc_index=False``),
            ``sample_index`` (B,) int64.
        """
        while self.samples_consumed // self.global_batch_size in self.skipped:
            self.samples_consumed += self.global_batch_size
        first = self.samples_consumed + self.rank * self.local_batch_size
        indices = self.stream_indices(first, self.local_batch_size)
        self.samples_consumed += self.global_batch_size
        epochs = np.arange(first, first + self.local_batch_size) // self.num_samples
        return self.to_tensors(indices, epochs=epochs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Endless batches (the training loop decides when to stop)."""
        while True:
            yield self.next_batch()

    def to_tensors(
        self, indices: np.ndarray, keep: np.ndarray | None = None, epochs: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Samples ``indices`` as training tensors (see :meth:`next_batch`).

        Args:
            indices: Sample indices of the split.
            keep: Optional per-sample mask; samples with ``False`` get all labels ``-100``.
            epochs: The epoch each sample is read in (masked-LM readers mask a sample anew in
                every epoch); default 0.
        """
        import torch

        tokens, length = self.view.rows(indices)
        if self.masking is not None:
            masked = self.masking(tokens, length, indices, epochs)
            if keep is not None:
                masked["labels"][~keep] = IGNORE_INDEX
                if "next_sentence_label" in masked:
                    masked["next_sentence_label"][~keep] = IGNORE_INDEX
            masked["sample_index"] = np.asarray(indices, np.int64)
            return {k: torch.from_numpy(v) for k, v in masked.items()}
        inputs, labels = tokens[:, :-1], tokens[:, 1:]  # views of one array, as plain slicing gives
        padded = length < self.view.row_len
        if padded.any() or keep is not None:
            labels = labels.copy()
            labels[np.arange(1, self.view.row_len)[None, :] >= length[:, None]] = IGNORE_INDEX
            if keep is not None:
                labels[~keep] = IGNORE_INDEX
        if self.view.comparisons:
            # A reward model's targets: the rank (1 = best) of the answer that ends at each
            # input position, -100 elsewhere (see pack_chat.encode_comparisons).
            ranks = self.view.loss_mask(indices)[:, :-1].astype(np.int64)
            labels = np.where(ranks > 0, ranks, IGNORE_INDEX)
            if keep is not None:
                labels[~keep] = IGNORE_INDEX
        elif self.view.has_loss_mask:
            labels = labels.copy()
            labels[self.view.loss_mask(indices)[:, 1:] == 0] = IGNORE_INDEX
        out = {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "sample_index": torch.from_numpy(np.asarray(indices, np.int64)),
        }
        if self.doc_index or self.view.has_loss_mask:
            # Documents are separated by EOS, and text never encodes to EOS (packing encodes
            # special tokens as plain text), so a new document starts after every EOS.
            eos = inputs == self.manifest.tokenizer.eos_id
            doc = np.cumsum(eos, axis=1, dtype=np.int32)
            doc -= eos
            if padded.any():
                doc[np.arange(self.view.row_len - 1)[None, :] >= length[:, None]] = -1
            out["doc_index"] = torch.from_numpy(doc)
            if self.view.has_loss_mask:
                # Each example sees itself alone: positions restart at 0 where it starts.
                t = np.arange(doc.shape[1])
                starts = np.ones_like(doc, bool)
                starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
                out["position_ids"] = torch.from_numpy(
                    t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)
                )
        return out

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """One pass over the split in storage order, as this rank's slices of global batches.

        Every rank gets the same number of batches (needed by collective forward passes):
        the last global batch is filled up from the start of the split with samples whose
        labels are all ``-100``, so each sample counts in the loss exactly once.
        """
        n, G = self.num_samples, self.global_batch_size
        for b in range(-(-n // G)):
            pos = np.arange(b * G, (b + 1) * G)[self.rank * self.local_batch_size :][
                : self.local_batch_size
            ]
            yield self.to_tensors(pos % n, keep=pos < n)

    def state_dict(self) -> dict[str, Any]:
        """The reader's whole position: ``samples_consumed`` (+ seed, epoch, manifest fingerprint)."""
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "epoch": self.epoch,
            "manifest_fingerprint": self.manifest_fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; a different shard set is an error unless allowed.

        Args:
            state: From :meth:`state_dict`, possibly saved with another world size.
        """
        missing = {"samples_consumed", "seed", "manifest_fingerprint"} - set(state)
        if missing:
            raise CrucibleError(
                f"reader state lacks {', '.join(sorted(missing))}; it is not a reader state"
            )
        if (
            state["manifest_fingerprint"] != self.manifest_fingerprint
            and not self.allow_manifest_change
        ):
            raise CrucibleError(
                f"the checkpoint was trained on shards {state['manifest_fingerprint'][:16]}…, but "
                f"{self.shards_dir} holds shards {self.manifest_fingerprint[:16]}…; point the run at "
                "its original shards, or set allow_manifest_change to continue on these"
            )
        if int(state["seed"]) != self.seed:
            raise CrucibleError(
                f"the checkpoint's data seed is {state['seed']} but the reader's is {self.seed}; "
                "resume with the same seed"
            )
        self.samples_consumed = int(state["samples_consumed"])
