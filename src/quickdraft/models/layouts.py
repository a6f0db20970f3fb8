"""Linear layers with the fastest matmul layout for the number of rows, on CPUs in float32.

A verification forward multiplies a few rows (one per verified token) by each weight matrix. On CPUs in
float32 ``F.linear`` (``x @ W^T``) is not always the fastest way to do that; ``(W @ x^T)^T`` computes the same
products in another order and is faster for some row counts. The choice only changes the order in which
float32 products are summed (differences of about 1e-6 relative), the same kind of difference that already
separates a 1-row from a k-row forward. Elsewhere (CUDA, other dtypes) ``F.linear`` is used unchanged.

Measured on a 2-core AMD EPYC (AVX2) with SmolLM2-135M, float32, 300 cached tokens:

- The output projection (49152 x 576 head, alone): one row takes 8.4 ms with ``F.linear`` and 4.5 ms as
  ``x @ W^T`` with a contiguous copy of ``W^T``; 2, 4, 8 and 16 rows take 18.5 / 19.0 / 17.4 / 20.5 ms with
  ``F.linear`` and 4.9 / 5.1 / 8.9 / 13.6 ms as ``(W @ x^T)^T``.
- The decoder layers' linears (whole verification forward, only their layout changed, median of 10 interleaved
  rounds): 2, 3, 4, 6, 8, 10 rows take 70.2 / 84.7 / 76.8 / 71.9 / 75.5 / 88.3 ms with ``F.linear`` and
  42.4 / 50.5 / 45.7 / 59.8 / 64.0 / 84.6 ms as ``(W @ x^T)^T``; one row 50.0 vs 48.9 ms; 12 and 24 rows are
  slower transposed (104.2 vs 88.3, 112.0 vs 110.4 ms). In bfloat16 ``(W @ x^T)^T`` is about 2x slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Most rows for which a decoder layer's linear runs as ``(W @ x^T)^T`` on CPU in float32.
MAX_TRANSPOSED_ROWS = 10


def _uses_cpu_layouts(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on CPU in float32 with at most ``MAX_TRANSPOSED_ROWS`` rows computed as
    ``(W @ x^T)^T``, a single row padded with a row of zeros (two rows are faster than one)."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count > MAX_TRANSPOSED_ROWS or not _uses_cpu_layouts(weight):
        return F.linear(x, weight, bias)
    if count == 1:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return _transposed_product(rows, weight, bias)[:count].reshape(*x.shape[:-1], weight.shape[0])


def _transposed_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = (weight @ rows.T).T.contiguous()
    return out if bias is None else out + bias


class OutputProjection:
    """``logits = hidden @ W^T + b`` for a ``torch.nn.Linear`` head: 1 row as ``x @ W^T`` on a contiguous copy
    of ``W^T``, several rows as ``(W @ x^T)^T`` (CPU, float32)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        self.weight = head.weight
        self.bias = head.bias
        self.uses_cpu_layouts = _uses_cpu_layouts(self.weight)
        self._transposed = self.weight.detach().t().contiguous() if self.uses_cpu_layouts else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` for ``hidden [..., H]``."""
        if not self.uses_cpu_layouts:
            return F.linear(hidden, self.weight, self.bias)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] == 1:
            logits = rows @ self._transposed
            logits = logits if self.bias is None else logits + self.bias
        else:
            logits = _transposed_product(rows, self.weight, self.bias)
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])
