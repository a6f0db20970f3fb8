"""Kernel-ready quantized weights kept in the cache, so that a second load reads them instead of building them.

Building quantized weights costs seconds on every load: reading a GGUF file's int4 groups, packing them for
``torch._weight_int4pack_mm_for_cpu`` (whose packed layout depends on the CPU's instruction set) and
quantizing the other linears to int8. :class:`PackedWeights` records what
:class:`~quickdraft.models.quantized.QuantizedWeights` builds on the first load and saves it (cache kind
``packed-weights``, keyed by the model file's fingerprint, the weights mode, the activation dtype and
:func:`quickdraft.cache.machine_key`); later loads look each stacked linear up by its layers' names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quickdraft import cache
from quickdraft.models.layouts import StackedLinear
from quickdraft.models.quantized import ConcatenatedLinear, Int4Linear, Int8Linear, restored_linear

KIND = "packed-weights"
LAYOUT_FILE = "layout.json"
TENSORS_FILE = "weights.safetensors"
#: The kinds of quantized linear a cache entry holds, and the kernel tensors of each.
KINDS: dict[str, tuple[type[StackedLinear], tuple[str, ...]]] = {
    "int4": (Int4Linear, ("packed", "scales_and_zeros")),
    "int8": (Int8Linear, ("codes", "scales")),
}


class PackedWeights:
    """The stacked quantized linears of one model by the names of their layers: those read from the cache
    (``saved``), and those built during this load (recorded, then saved by :meth:`save`)."""

    def __init__(self, names: dict[torch.nn.Module, str], key: dict[str, str] | None,
                 saved: dict[str, StackedLinear] | None = None) -> None:
        """``names``: each layer's name in the model; ``key``: the cache key to save under (None: no saving)."""
        self.names = names
        self.key = key
        self.saved = saved or {}
        self.built: dict[str, StackedLinear] = {}

    @classmethod
    def for_model(cls, path: Path, hf_model: torch.nn.Module, mode: str, dtype: torch.dtype) -> PackedWeights:
        """The packed weights of the model at ``path`` in weights ``mode`` with ``dtype`` activations, read from
        the cache where an earlier load saved them (an entry that cannot be read is dropped and rebuilt:
        :func:`quickdraft.cache.read_entry`)."""
        names = {module: name for name, module in hf_model.named_modules()}
        key = {**cache.source_key(path), **cache.machine_key("cpu"), "weights": mode, "dtype": str(dtype)}
        saved = cache.read_entry(KIND, key, read)
        return cls(names, key) if saved is None else cls(names, None, saved)

    def lookup(self, layers: Sequence[torch.nn.Module]) -> StackedLinear | None:
        return self.saved.get(self._name(layers))

    def record(self, layers: Sequence[torch.nn.Module], linear: StackedLinear) -> None:
        self.built[self._name(layers)] = linear

    def save(self) -> None:
        """Store what this load built, where it read nothing from the cache."""
        if self.key is None or not self.built:
            return
        cache.store(KIND, self.key, lambda folder: write(folder, self.built), label="packed quantized weights")
        self.built = {}

    def _name(self, layers: Sequence[torch.nn.Module]) -> str:
        return "+".join(self.names[layer] for layer in layers)


def write(folder: Path, linears: dict[str, StackedLinear]) -> None:
    """Save ``linears`` (by name) as one safetensors file and a JSON layout of their kinds and sizes."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layout = {name: _flattened(linear, name, tensors) for name, linear in linears.items()}
    save_file({name: t.contiguous() for name, t in tensors.items()}, folder / TENSORS_FILE)
    (folder / LAYOUT_FILE).write_text(json.dumps(layout))


def read(folder: Path) -> dict[str, StackedLinear]:
    """The inverse of :func:`write`."""
    from safetensors.torch import load_file

    # cloned: the kernels read with aligned vector loads, and safetensors' tensors need not be aligned
    tensors = {name: tensor.clone() for name, tensor in load_file(folder / TENSORS_FILE).items()}
    layout = json.loads((folder / LAYOUT_FILE).read_text())
    return {name: _rebuilt(entry, name, tensors) for name, entry in layout.items()}


def _flattened(linear: StackedLinear, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``linear``'s layout entry; its tensors go into ``tensors`` under ``prefix``."""
    entry: dict[str, Any] = {"sizes": linear.sizes, "bias": linear.bias is not None}
    if linear.bias is not None:
        tensors[f"{prefix}.bias"] = linear.bias
    for kind, (cls, names) in KINDS.items():
        if isinstance(linear, cls):
            tensors.update({f"{prefix}.{name}": getattr(linear, name) for name in names})
            return {**entry, "kind": kind}
    if isinstance(linear, ConcatenatedLinear):
        parts = [_flattened(part, f"{prefix}.{i}", tensors) for i, part in enumerate(linear.parts)]
        return {**entry, "kind": "concatenated", "parts": parts}
    raise TypeError(f"cannot cache a {type(linear).__name__}")


def _rebuilt(entry: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> StackedLinear:
    """The inverse of :func:`_flattened`."""
    bias = tensors[f"{prefix}.bias"] if entry["bias"] else None
    if entry["kind"] in KINDS:
        cls, names = KINDS[entry["kind"]]
        return restored_linear(cls, entry["sizes"], bias, **{name: tensors[f"{prefix}.{name}"] for name in names})
    if entry["kind"] == "concatenated":
        return ConcatenatedLinear([_rebuilt(part, f"{prefix}.{i}", tensors) for i, part in enumerate(entry["parts"])])
    raise ValueError(f"unknown packed kind {entry['kind']!r}")
