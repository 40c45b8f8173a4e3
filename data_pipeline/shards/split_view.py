"""Random access to the rows of one memory-mapped shard split (the training reader's
storage side)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from crucible.data_pipeline.shards.manifest import Manifest
from crucible.errors import CrucibleError


class SplitView:
    """Random access by index to the rows of one split, memory-mapped (no copy until read)."""

    def __init__(self, local_dir: Path, manifest: Manifest, split: str = "train") -> None:
        """Map every shard file of ``split``.

        Args:
            local_dir: The shard directory on a local filesystem (see :func:`local_shards`).
            manifest: Its manifest (already verified by the caller when it wants checks).
            split: ``train`` or ``heldout``.
        """
        d = Path(local_dir)
        self.row_len = manifest.row_len
        self._tokens: list[np.ndarray] = []  # (rows, row_len) views into the mapped files
        self._length: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []  # chat shards: (rows, row_len) uint8 loss masks
        self.has_loss_mask = manifest.chat_template is not None
        self.comparisons = manifest.comparisons  # the mask holds ranks, not target bits
        self._batches: list[pa.RecordBatch] = []
        sizes = []
        for shard in manifest.split(split).shards:
            reader = pa.ipc.open_stream(pa.memory_map(str(d / shard.file)))
            for rb in reader:
                toks = rb.column("tokens")
                self._tokens.append(toks.flatten().to_numpy().reshape(-1, self.row_len))
                self._length.append(rb.column("length").to_numpy())
                if self.has_loss_mask:
                    m = rb.column("loss_mask").flatten().to_numpy()
                    self._mask.append(m.reshape(-1, self.row_len))
                self._batches.append(rb)
                sizes.append(rb.num_rows)
        self._first = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_samples = int(self._first[-1])

    def _locate(self, indices: np.ndarray) -> tuple[list[int], list[int]]:
        """(record batch, row within it) of each index."""
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][0]
            raise CrucibleError(
                f"sample {bad} is out of range: the split has {self.num_samples} samples"
            )
        c = np.searchsorted(self._first, idx, side="right") - 1
        return c.tolist(), (idx - self._first[c]).tolist()

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``indices``: tokens (B, row_len) int64 and their real lengths (B,) int64.

        Args:
            indices: Sample indices of the split.
        """
        chunks, rows = self._locate(indices)
        B, L = len(chunks), self.row_len
        tokens = np.empty((B, L), self._tokens[0].dtype if self._tokens else np.uint16)
        length = np.empty(B, np.int64)
        for i, (c, r) in enumerate(zip(chunks, rows, strict=True)):
            tokens[i] = self._tokens[c][r]  # the only copy out of the mapped file
            length[i] = self._length[c][r]
        return tokens.astype(np.int64), length

    def loss_mask(self, indices: np.ndarray) -> np.ndarray:
        """Loss masks (B, row_len) of rows ``indices`` of a chat split: 1 on targets.

        Args:
            indices: Sample indices of the split.
        """
        chunks, rows = self._locate(indices)
        return np.stack([self._mask[c][r] for c, r in zip(chunks, rows, strict=True)])

    def doc_ids(self, index: int) -> list[str]:
        """Ids of the documents whose tokens sample ``index`` holds, in order (its lineage).

        Args:
            index: Sample index of the split.
        """
        (c,), (r,) = self._locate(np.array([index]))
        return self._batches[c].column("doc_ids")[r].as_py()

    def row_id(self, index: int) -> int:
        """Position of sample ``index`` in packing order (before the build-time shuffle).

        Args:
            index: Sample index of the split.
        """
        (c,), (r,) = self._locate(np.array([index]))
        return int(self._batches[c].column("row_id")[r].as_py())
