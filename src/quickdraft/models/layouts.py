"""The native forward's linear layers, with weights prepacked for the CPU's matmul library.

A verification forward multiplies a few rows (one per verified token) by each weight matrix. ``F.linear``
reads the weight in its plain row-major layout on every call. oneDNN (the matmul library inside PyTorch's CPU
build) can instead reorder a weight once into the blocked layout its kernels read: a *prepacked* weight (what
PyTorch's compiler uses when it freezes a model for CPU inference). Products of few rows are faster with it;
it is a second copy of the weight in memory. oneDNN prepacks float32 weights on any x86 CPU, and bfloat16
weights where the CPU computes bfloat16 natively (AVX-512 BF16 or AMX).

The rules the products follow, so that the linears of a verification forward of any width give, bit for bit,
the rows that one-row forwards would (``F.linear`` does not promise that):

- a product with a prepacked weight of two to :data:`ROW_INVARIANT_ROWS` rows computes each row the same
  way, so with ``row_exact=True`` a wider input is multiplied in pieces of at most that many rows;
- a lone row is computed as the first of two equal rows;
- a forward that is not row-exact (a long prompt's first forward) keeps one product, which is faster than
  pieces.

Layers that read the same input are fused into one weight (q, k and v; gate and up), so a decoder layer makes
four matmul calls instead of seven. Elsewhere (CUDA, float16, bfloat16 without native support, a PyTorch
without oneDNN) the fused weights go through ``F.linear``.

The measurements behind these rules (timings, and where row-invariance ends) are in
``results/native-forward.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

PREPACKED_DTYPES = (torch.float32, torch.bfloat16)
ROW_INVARIANT_ROWS = 32


def prepacking_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked: a CPU tensor in float32, or in bfloat16 where oneDNN computes
    bfloat16 natively (AVX-512 BF16 or AMX; it refuses to prepack bfloat16 elsewhere), and a PyTorch built
    with oneDNN."""
    if weight.device.type != "cpu" or weight.dtype not in PREPACKED_DTYPES:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return weight.dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class StackedLinear:
    """One or more ``torch.nn.Linear`` layers that read the same input, computed as one product with their
    weights stacked (rows of the first layer, then of the next). Calling it returns one output per layer: a
    tuple, or the tensor itself for a single layer.

    Subclasses hold the stacked weight in some form and compute the product in :meth:`_product`.
    ``exact_rows`` is the widest product whose rows each equal, bit for bit, the same row computed alone
    (None: any width, or no such promise where ``row_exact`` cannot help); a ``row_exact`` call wider than
    that is computed in pieces of at most that many rows."""

    exact_rows: int | None = None

    def __init__(self, sizes: Sequence[int], bias: torch.Tensor | None) -> None:
        self.sizes = list(sizes)
        self.bias = bias

    def __call__(self, x: torch.Tensor, row_exact: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``x [..., rows, in]`` times the weight, one output per layer (:meth:`whole` split); ``row_exact``:
        each row bit for bit as if it came alone."""
        out = self.whole(x, row_exact)
        if len(self.sizes) == 1:
            return out
        return out.split(self.sizes, dim=-1)

    def whole(self, x: torch.Tensor, row_exact: bool = False) -> torch.Tensor:
        """``x [..., rows, in]`` times the stacked weight: ``[..., rows, sum(sizes)]``, the layers' outputs
        side by side."""
        limit = self.exact_rows
        if row_exact and limit is not None and x.shape[-2] > limit:
            return torch.cat([self._product(piece) for piece in x.split(limit, dim=-2)], dim=-2)
        return self._product(x)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., rows, in]`` times the stacked weight, plus the bias: ``[..., rows, sum(sizes)]``."""
        raise NotImplementedError


class FusedLinear(StackedLinear):
    """Dense stacked weights: a prepacked copy where :func:`prepacking_available`, otherwise the concatenated
    weights (a single layer's own weight, not a copy) multiplied by ``F.linear``."""

    def __init__(self, layers: Sequence[torch.nn.Linear]) -> None:
        with torch.no_grad():
            weights = [layer.weight.detach() for layer in layers]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]
            super().__init__([layer.out_features for layer in layers], fused_bias(layers))
        self.prepacked = prepacking_available(weight)
        self.exact_rows = ROW_INVARIANT_ROWS if self.prepacked else None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.prepacked else weight

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepacked:
            return F.linear(x, self.weight, self.bias)
        return self._prepacked_product(x)

    def _prepacked_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` times the prepacked weight. A single row is computed as the first of two equal rows: for
        one row oneDNN may pick a kernel that sums in another order than for two or more, while every row
        count from two to :data:`ROW_INVARIANT_ROWS` gives each row bit for bit the same."""
        single = x.numel() == x.shape[-1]
        rows = torch.cat([x, x], dim=-2) if single else x.contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out[..., :1, :] if single else out


class WeightHolder(Protocol):
    """How the native forward holds its weights: which :class:`StackedLinear` a group of layers becomes,
    how tokens are embedded, and what of the transformers model it frees afterwards."""

    #: The weights mode it implements (``dense``, ``int8``, ``int4``; :mod:`quickdraft.models.quantized`).
    mode: str

    def linear(self, layers: Sequence[torch.nn.Linear]) -> StackedLinear: ...

    def embedding(self, table: torch.nn.Embedding, output: StackedLinear,
                  tied: bool) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def release(self, hf_model: torch.nn.Module) -> None: ...


class DenseWeights:
    """How the native forward holds its weights by default: :class:`FusedLinear` for the linears and the
    transformers model's own embedding table. The quantized counterpart is
    :class:`quickdraft.models.quantized.QuantizedWeights`; both offer the same three methods."""

    mode = "dense"

    def linear(self, layers: Sequence[torch.nn.Linear]) -> StackedLinear:
        """The layers (which read the same input) as one stacked product."""
        return FusedLinear(layers)

    def embedding(self, table: torch.nn.Embedding, output: StackedLinear, tied: bool) -> Callable[[torch.Tensor],
                                                                                                torch.Tensor]:
        """The token-embedding lookup; ``output`` is the output layer, which shares ``table``'s weight where
        ``tied``."""
        return table

    def release(self, hf_model: torch.nn.Module) -> None:
        """Free what the transformers model holds that the native forward no longer reads (nothing here)."""


def fused_bias(layers: Sequence[torch.nn.Linear]) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    parts = [layer.bias.detach() if layer.bias is not None
             else layer.weight.new_zeros(layer.out_features) for layer in layers]
    return torch.cat(parts)
