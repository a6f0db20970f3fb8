"""A static KV cache: fixed buffers indexed by position, so dropping rejected draft tokens costs nothing.

Slots ``[0, length)`` of each row hold the keys and values of committed tokens. A verification forward
writes its rows at slots ``length, length + 1, ...``; afterwards :meth:`StaticKVCache.compact` keeps only the
accepted path (moving its entries to consecutive slots) and :meth:`StaticKVCache.truncate` simply lowers the
length, so stale slots are overwritten by the next forward.

Rows are independent sequences with their own lengths (a *ragged* batch): :meth:`StaticKVCache.ragged_slots`
and :meth:`StaticKVCache.write_ragged` let one batched forward write each row at its own slots, and
:meth:`StaticKVCache.move_row` keeps the live rows of a server's batch contiguous (``0 .. B - 1``) so that
reads stay cheap slices.
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
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Committed length of row 0 (the single-sequence case)."""
        return self.lengths[0]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int,
              rows: slice | None = None) -> None:
        """Store ``[batch, heads, T, head_dim]`` new entries at slots ``start .. start + T`` of ``rows``
        (default: every row)."""
        end = start + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        if rows is None:
            self.keys[layer, :, :, start:end] = keys
            self.values[layer, :, :, start:end] = values
        else:
            self.keys[layer, rows, :, start:end] = keys
            self.values[layer, rows, :, start:end] = values

    def ragged_slots(self, starts: list[int], count: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors ``(row, slot)``, each ``[B, count]``, addressing slots ``starts[b] .. + count`` of
        row ``rows.start + b``: where one ragged forward writes (compute once, use for every layer)."""
        end = max(starts) + count
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        device = self.keys.device
        first = rows.start or 0
        row_index = torch.arange(first, first + len(starts), device=device).unsqueeze(1).expand(-1, count)
        slot_index = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(count, device=device)
        return row_index, slot_index

    def write_ragged(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                     slots: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Store ``[B, heads, T, head_dim]`` entries at the per-row slots from :meth:`ragged_slots`."""
        row_index, slot_index = slots
        self.keys[layer][row_index, :, slot_index] = keys.transpose(1, 2)
        self.values[layer][row_index, :, slot_index] = values.transpose(1, 2)

    def read(self, layer: int, end: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots ``[0, end)`` of ``layer`` for ``rows`` (default: every row)."""
        if rows is None:
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        return self.keys[layer, rows, :, :end], self.values[layer, rows, :, :end]

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

    def move_row(self, source: int, target: int) -> None:
        """Copy row ``source``'s committed entries and length into row ``target``; ``source`` is emptied."""
        if source == target:
            return
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)
