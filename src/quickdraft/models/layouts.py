"""The native forward's linear layers, with weights prepacked for the CPU's matmul library.

A verification forward multiplies a few rows (one per verified token) by each weight matrix. ``F.linear``
reads the weight in its plain row-major layout on every call. oneDNN (the matmul library inside PyTorch's CPU
build) can instead reorder a weight once into the blocked layout its kernels read: a *prepacked* weight, what
PyTorch's compiler uses when it freezes a model for CPU inference. Products of a few rows with a prepacked
weight run about twice as fast in float32 on a 2-core AVX2 CPU, and each output row is then computed the same
way whatever the number of rows: the linears of a k-row verification forward give, bit for bit, the rows that
k one-row forwards would (``F.linear`` does not promise that).

Layers that read the same input are fused into one weight (q, k and v; gate and up), so a decoder layer makes
four matmul calls instead of seven. Elsewhere (CUDA, half precision, a PyTorch without oneDNN) the fused
weights go through ``F.linear``.

Measured on a 2-core AMD EPYC (AVX2), float32 (``F.linear`` vs prepacked, ms, median of repeated timings): 30
calls of the 1536 x 576 MLP weight at 1 / 8 / 16 rows 5.4 / 8.9 / 16.0 vs 2.2 / 6.0 / 9.9; one call of the
49152 x 576 output head 10.4 / 25.2 / 30.5 vs 5.8 / 9.8 / 11.9.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def prepacking_available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can be prepacked: a float32 CPU tensor and a PyTorch built with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class FusedLinear:
    """One or more ``torch.nn.Linear`` layers that read the same input, computed as one matmul.

    ``weight`` is the layers' weights stacked: a prepacked copy where :func:`prepacking_available`, otherwise
    the concatenated weights (a single layer's own weight, not a copy). Calling it returns one output per
    layer: a tuple, or the tensor itself for a single layer."""

    def __init__(self, layers: Sequence[torch.nn.Linear]) -> None:
        with torch.no_grad():
            weights = [layer.weight.detach() for layer in layers]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]
            self.bias = _fused_bias(layers)
        self.sizes = [layer.out_features for layer in layers]
        self.prepacked = prepacking_available(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.prepacked else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.prepacked:
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        else:
            out = F.linear(x, self.weight, self.bias)
        if len(self.sizes) == 1:
            return out
        return out.split(self.sizes, dim=-1)


def _fused_bias(layers: Sequence[torch.nn.Linear]) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    parts = [layer.bias.detach() if layer.bias is not None
             else layer.weight.new_zeros(layer.out_features) for layer in layers]
    return torch.cat(parts)
