"""The KV cache of decoding: every layer's keys and values for a batch of rows.

Keys and values are stored ``kv_heads`` wide (GQA and MQA keep only their shared heads).
``GPT.forward(tokens, cache=cache)`` appends ``tokens`` to every row: :meth:`KVCache.extend`
hands out their positions (rotary or learned) and the attention mask, and each layer writes
its keys and values into the reserved slots through its :class:`LayerCache`.

Rows may be left-padded (``pad``): a row's padding is never attended to and does not count
as positions, so each row decodes exactly as it would alone.

Attention always runs over all ``max_len`` slots, the unfilled ones masked: every decode step
then has the same shapes, so kernels that plan per shape (cuDNN's attention) plan once
rather than at every step.
"""

from __future__ import annotations

import torch

from crucible.model.config import ModelConfig


class LayerCache:
    """One layer's keys and values, [B, kv_heads, max_len, head_dim] each."""

    def __init__(self, owner: KVCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.owner, self.keys, self.values = owner, keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the current forward's keys and values [B, kv_heads, T, head_dim] into the
        slots :meth:`KVCache.extend` reserved; return all slots' (the mask hides the rest)."""
        start, end = self.owner.start, self.owner.length
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys, self.values


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows of up to ``max_len`` slots.

    Args:
        cfg: the model shape.
        batch_size: rows.
        max_len: slots per row (padding included); at most ``cfg.max_seq_len``.
        pad: [B] leading padding slots of each row (left padding); default none.
        device: where the tensors live.
        dtype: the model's dtype.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        pad: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache of {max_len} slots exceeds max_seq_len {cfg.max_seq_len}")
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.layers = [
            LayerCache(
                self,
                torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype),
            )
            for _ in range(cfg.n_layers)
        ]
        self.max_len = max_len
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad
        self.start = 0  # first slot of the current forward
        self.length = 0  # slots filled, the current forward's included

    def extend(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve the next ``n`` slots of every row for a forward of ``n`` tokens.

        Returns:
            Positions [B, n] of the new tokens (the slot less the row's padding), and the
            attention mask [B, 1, n, max_len] (True: attend): every earlier or same slot that
            is not padding. A padding slot attends to itself only, so no softmax row is empty.
        """
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise ValueError(f"{end} tokens exceed the cache's {self.max_len} slots")
        self.start, self.length = start, end
        device = self.pad.device
        query = torch.arange(start, end, device=device)[:, None]  # [n, 1]
        key = torch.arange(self.max_len, device=device)  # [max_len]
        real = key >= self.pad[:, None]  # [B, max_len]
        mask = (key <= query) & (real[:, None, :] | (key == query))  # [B, n, max_len]
        positions = (query.T - self.pad[:, None]).clamp(min=0)  # [B, n]
        return positions, mask[:, None]
