"""A static KV cache: fixed buffers indexed by position, so dropping rejected draft tokens costs nothing.

Slots ``[0, length)`` of each row hold the keys and values of committed tokens. A verification forward
writes its rows at slots ``length, length + 1, ...``; afterwards :meth:`StaticKVCache.compact` keeps only the
accepted path (moving its entries to consecutive slots) and :meth:`StaticKVCache.truncate` simply lowers the
length, so stale slots are overwritten by the next forward.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of ``num_layers`` layers for ``batch`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * batch
        self.max_len = max_len

    @property
    def length(self) -> int:
        """Committed length of row 0 (the single-sequence case)."""
        return self.lengths[0]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Store ``[batch, heads, T, head_dim]`` new entries at slots ``start .. start + T``."""
        end = start + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[0, end)`` of ``layer``."""
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def truncate(self, length: int, row: int = 0) -> None:
        """Forget every slot at or after ``length`` in ``row``; O(1)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"cannot truncate to {length}: capacity is {self.max_len}")
        self.lengths[row] = length

    def compact(self, start: int, keep: list[int], row: int = 0) -> None:
        """Keep the entries at slots ``start + k`` for ``k`` in ``keep`` (ascending), moved to slots
        ``start, start + 1, ...``; the row's length becomes ``start + len(keep)``."""
        if keep != list(range(len(keep))):
            source = torch.tensor(keep, device=self.keys.device) + start
            target = slice(start, start + len(keep))
            self.keys[:, row, :, target] = self.keys[:, row, :, source]
            self.values[:, row, :, target] = self.values[:, row, :, source]
        self.lengths[row] = start + len(keep)

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
