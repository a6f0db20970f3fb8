"""Quantized weights for the native forward: int8 per output channel, and a GGUF file's own int4 groups.

Terms:

- *weights mode*: how the native forward holds its linear weights. ``dense`` (the transformers model's float
  weights, prepacked where :mod:`quickdraft.models.layouts` can), ``int8``, ``int4``, or ``auto``
  (:func:`holder_for`).
- *int8 per output channel*: ``w[r, c] = scale[r] * code[r, c]`` with codes in -127..127 and
  ``scale[r] = max |w[r, :]| / 127``, multiplied by ``torch._weight_int8pack_mm``. A re-quantization: it
  changes the weights (by at most half a step, ``scale[r] / 2``).
- *int4 group*: 32 weights of a row with one scale and one zero (:mod:`quickdraft.models.gguf_blocks`),
  multiplied by ``torch._weight_int4pack_mm_for_cpu``. Only a GGUF file's Q4_0 / Q4_1 / Q4_K tensors become
  int4 groups, code for code; ``int4`` holds every other linear (Q5/Q6/Q8/float tensors, or all of a dense
  checkpoint) as int8 per output channel.
- *activation dtype*: the dtype of the hidden states the kernels multiply (and of the scales, which the
  kernels take in that dtype). Both kernels are fast with bfloat16 activations, also on CPUs without native
  bfloat16, and several times slower with float32 ones, so ``dtype="auto"`` means bfloat16 here.

Quantized linears keep the native forward's row-exact verification by the same rule as prepacked dense ones:
a ``row_exact`` product is computed in pieces of at most ``ROW_INVARIANT_ROWS`` rows, within which both
kernels give each row bit for bit as computed alone (measured: ``results/native-forward.md``). The output
layer is quantized too; where it shares its weight with the token embedding (tied), the embedding reads rows
of the same int8 table.

A product of at least :data:`WIDE_ROWS` rows that need not be row-exact (a prompt's first forward) is computed
with the layer's weights dequantized to the activation dtype for that call, one layer at a time: the kernels
compute each row on their own, and a 1000-token prompt took several times longer through them than its
dequantization and a dense product (:mod:`quickdraft.models.int4_layout`). Such a forward rounds otherwise
than the kernels; it was never row-exact.

The transformers model's float copies of the quantized weights are freed once packed (:meth:`release`):
afterwards that model's linears raise if called; the native target is the model.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from quickdraft.devices import cpu_has_native_bf16
from quickdraft.models.gguf_blocks import GROUP, INT4_TYPES, Int4Groups, int4_groups
from quickdraft.models.int4_layout import unpacked_codes
from quickdraft.models.layouts import (
    ROW_INVARIANT_ROWS,
    DenseWeights,
    FusedLinear,
    StackedLinear,
    WeightHolder,
    fused_bias,
)

WEIGHT_MODES = ("dense", "int8", "int4", "auto")
DEFAULT_WEIGHTS = "auto"
QUANTIZED_MODES = ("int8", "int4")
AUTO_ROWS = (1, 4)
#: The fewest rows of a product that is not row-exact computed with dequantized weights (module docstring).
WIDE_ROWS = 128
#: Rounds of :func:`fastest_mode`; each times every candidate once.
AUTO_ROUNDS = 12
#: How many bytes of dense weights :func:`fastest_mode` times at most (whole decoder layers, from the first).
AUTO_BYTES = 256 * 2**20

log = logging.getLogger(__name__)


class LinearStore(Protocol):
    """Where quantized linears built on an earlier load are found, and those built now go
    (:class:`quickdraft.models.packed_cache.PackedWeights`)."""

    def lookup(self, layers: Sequence[torch.nn.Module]) -> StackedLinear | None: ...

    def record(self, layers: Sequence[torch.nn.Module], linear: StackedLinear) -> None: ...

    def save(self) -> None: ...


#: Makes the :class:`LinearStore` of a weights mode and activation dtype, or None for none.
StoreFactory = Callable[[str, torch.dtype], LinearStore | None]
#: A GGUF file's int4 groups by the transformers model's linear layer they belong to.
Groups = dict[torch.nn.Module, Int4Groups]


def check_weights(mode: str, device: torch.device) -> None:
    """Raise ``ValueError`` for an unknown mode, or a quantized one on a device the kernels do not run on."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {mode!r}; choose {', '.join(WEIGHT_MODES)}")
    if mode in QUANTIZED_MODES and device.type != "cpu":
        raise ValueError(f"weights {mode!r} run on CPU only (PyTorch's CPU int8/int4 kernels), not {device.type}")


def loading_dtype(mode: str, dense_dtype: torch.dtype) -> torch.dtype:
    """The dtype to load the transformers model in: float32 for what may be quantized (int8 codes are then
    computed from unrounded weights), else the dense dtype."""
    return dense_dtype if mode == "dense" else torch.float32


def holder_for(mode: str, path: Path, hf_model: torch.nn.Module, dtype_name: str,
               dense_dtype: torch.dtype, store: StoreFactory = lambda mode, dtype: None) -> WeightHolder:
    """The :class:`WeightHolder` for weights ``mode`` of ``hf_model`` loaded from ``path`` (in
    :func:`loading_dtype`); its ``mode`` says which it is (``auto`` resolved). ``dtype_name`` is the dtype the
    user asked for: ``auto`` gives bfloat16 activations to quantized modes and ``dense_dtype`` to dense;
    anything else is used as asked.

    ``auto`` on a GGUF file with int4 tensors picks whichever of ``dense`` and ``int4`` (the choices that keep
    the file's own weights) runs the linears faster on this CPU (:func:`fastest_mode`,
    measured once per model and machine and cached); on anything else, or off CPU, it is ``dense``."""
    quantized_dtype = torch.bfloat16 if dtype_name == "auto" else dense_dtype
    gguf = path.is_file() and path.suffix == ".gguf"
    groups = functools.cache(lambda: gguf_int4_groups(path, hf_model) if gguf else {})
    if mode == "auto":
        on_cpu = next(hf_model.parameters()).device.type == "cpu"
        mode = cached_fastest_mode(path, hf_model, groups, quantized_dtype, dense_dtype) if gguf and on_cpu \
            else "dense"
        log.info("weights auto: %s", mode)
    if mode == "dense":
        _cast_parameters(hf_model, dense_dtype)
        return DenseWeights()
    return QuantizedWeights(quantized_dtype, groups if mode == "int4" else {}, store(mode, quantized_dtype))


class QuantizedWeights:
    """A :class:`~quickdraft.models.layouts.WeightHolder` of quantized linears: int4 groups for the layers in
    ``groups`` (a GGUF file's 4-bit tensors, by module), int8 per output channel for every other linear and
    the embedding, with ``dtype`` activations."""

    def __init__(self, dtype: torch.dtype, groups: Groups | Callable[[], Groups] | None = None,
                 packed: LinearStore | None = None) -> None:
        """``groups``: the int4 groups by layer, or a function that reads them (called only where a layer is
        not in ``packed``); ``packed``: kernel-ready weights of an earlier load, and where new ones go."""
        self.dtype = dtype
        self._groups = groups if groups is not None else {}
        self.packed = packed
        #: ``int4`` where layers may have int4 groups, else ``int8``.
        self.mode = "int4" if callable(groups) or groups else "int8"

    @property
    def groups(self) -> Groups:
        if callable(self._groups):
            self._groups = self._groups()
        return self._groups

    def linear(self, layers: Sequence[torch.nn.Linear]) -> StackedLinear:
        """Int4 for the runs of consecutive layers that have groups, int8 for the others; several runs (say
        q and k in Q4_K, v in Q6_K) are multiplied separately and their outputs concatenated. Read from
        ``packed`` where it holds them, and recorded there where it does not."""
        found = self.packed.lookup(layers) if self.packed else None
        if found is not None:
            return found
        runs = [list(run) for _, run in itertools.groupby(layers, key=lambda layer: layer in self.groups)]
        parts = [self._run(run) for run in runs]
        linear = parts[0] if len(parts) == 1 else ConcatenatedLinear(parts)
        if self.packed:
            self.packed.record(layers, linear)
        return linear

    def _run(self, layers: list[torch.nn.Linear]) -> StackedLinear:
        sizes = [layer.out_features for layer in layers]
        bias = fused_bias(layers)
        bias = None if bias is None else bias.to(self.dtype)
        with torch.no_grad():
            if layers[0] in self.groups:
                return Int4Linear(Int4Groups.stacked([self.groups[layer] for layer in layers]), sizes, bias,
                                  self.dtype)
            return Int8Linear(torch.cat([layer.weight.detach().float() for layer in layers]), sizes, bias,
                              self.dtype)

    def embedding(self, table: torch.nn.Embedding, output: StackedLinear,
                  tied: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Rows of the output layer's int8 table where tied, else of the embedding's own int8 table."""
        if tied and isinstance(output, Int8Linear):
            return Int8Embedding(output.codes, output.scales)
        with torch.no_grad():
            codes, scales = int8_per_channel(table.weight.detach().float(), self.dtype)
        return Int8Embedding(codes, scales)

    def release(self, hf_model: torch.nn.Module) -> None:
        """Free the transformers model's float linear and embedding weights (now packed) and cast what is
        left (norms) to the activation dtype."""
        for module in hf_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                _release(module)
        _cast_parameters(hf_model, self.dtype)
        _return_freed_memory()
        if self.packed:
            self.packed.save()


class QuantizedLinear(StackedLinear):
    """Stacked weights in a quantized form with a kernel of its own (:meth:`_product`); a product of at least
    :data:`WIDE_ROWS` rows that need not be row-exact multiplies the dequantized weights instead."""

    exact_rows = ROW_INVARIANT_ROWS

    def whole(self, x: torch.Tensor, row_exact: bool = False) -> torch.Tensor:
        if not row_exact and x.numel() >= WIDE_ROWS * x.shape[-1]:
            weight = self.dequantized_weight()
            if weight is not None:
                return _dense_product(x, weight, self.bias)
        return super().whole(x, row_exact)

    def dequantized_weight(self) -> torch.Tensor | None:
        """The weights ``[out, in]`` in float32, or None where they cannot be read back cheaply."""
        raise NotImplementedError


def _dense_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., rows, in]`` times the float32 ``weight [out, in]``, in ``x``'s dtype where the CPU computes it
    natively, else in float32 (bfloat16 products without AVX-512 BF16 or AMX are slow); returned in ``x``'s
    dtype."""
    dtype = x.dtype if x.dtype != torch.bfloat16 or cpu_has_native_bf16() else torch.float32
    out = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return out.to(x.dtype)


class Int8Linear(QuantizedLinear):
    """Stacked weights ``[out, in]`` as int8 per output channel (module docstring)."""

    def __init__(self, weight: torch.Tensor, sizes: Sequence[int], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        """``weight [out, in]`` float; ``bias [out]`` in ``dtype`` or None."""
        super().__init__(sizes, bias)
        self.codes, self.scales = int8_per_channel(weight, dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(_flat(x), self.codes, self.scales)
        return _shaped(out, x, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float().unsqueeze(1)


class Int4Linear(QuantizedLinear):
    """Stacked weights as int4 groups of 32 (:class:`~quickdraft.models.gguf_blocks.Int4Groups`), packed for
    ``torch._weight_int4pack_mm_for_cpu``; scales and zeros in the activation dtype. The kernel's weight is
    ``(code - 8) * scale + zero``."""

    def __init__(self, groups: Int4Groups, sizes: Sequence[int], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__(sizes, bias)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        # [in / 32, out, 2]: the kernel's layout of (scale, zero) per group
        self.scales_and_zeros = torch.stack([groups.scales, groups.zeros], dim=-1).transpose(0, 1).contiguous() \
            .to(dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(_flat(x), self.packed, GROUP, self.scales_and_zeros)
        return _shaped(out, x, self.bias)

    def dequantized_weight(self) -> torch.Tensor | None:
        """From the packed codes (:func:`~quickdraft.models.int4_layout.unpacked_codes`); None where their
        layout is not known here."""
        groups, rows = self.scales_and_zeros.shape[:2]
        codes = unpacked_codes(self.packed, rows, groups * GROUP)
        if codes is None:
            return None
        scales, zeros = self.scales_and_zeros.float().permute(2, 1, 0).unsqueeze(-1)  # each [out, in / 32, 1]
        return ((codes.view(rows, groups, GROUP).float() - 8) * scales + zeros).view(rows, groups * GROUP)

    def dequantized(self) -> torch.Tensor:
        """The weights ``[out, in]`` the kernel multiplies by, read back through the kernel itself (a product
        with the identity, in the scales' dtype)."""
        columns = self.scales_and_zeros.shape[0] * GROUP
        eye = torch.eye(columns, dtype=self.scales_and_zeros.dtype)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.scales_and_zeros).T


def restored_linear(cls: type[StackedLinear], sizes: Sequence[int], bias: torch.Tensor | None,
                    **tensors: torch.Tensor) -> StackedLinear:
    """A ``cls`` (:class:`Int8Linear`: ``codes``, ``scales``; :class:`Int4Linear`: ``packed``,
    ``scales_and_zeros``) holding ready kernel ``tensors`` (a cache's) instead of building them."""
    linear = cls.__new__(cls)
    StackedLinear.__init__(linear, sizes, bias)
    vars(linear).update(tensors)
    return linear


class ConcatenatedLinear(StackedLinear):
    """Stacked layers held in several parts (say int4 and int8), each multiplied on its own; the outputs are
    concatenated in the layers' order."""

    def __init__(self, parts: Sequence[StackedLinear]) -> None:
        super().__init__([size for part in parts for size in part.sizes], None)
        self.parts = list(parts)
        limits = [part.exact_rows for part in parts if part.exact_rows is not None]
        self.exact_rows = min(limits) if limits else None

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part._product(x) for part in self.parts], dim=-1)

    def whole(self, x: torch.Tensor, row_exact: bool = False) -> torch.Tensor:
        return torch.cat([part.whole(x, row_exact) for part in self.parts], dim=-1)


class Int8Embedding:
    """Token embedding read from an int8 table: row ``t`` is ``scales[t] * codes[t]``. ``codes [vocab,
    hidden]`` int8, ``scales [vocab]`` in the activation dtype."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes = codes
        self.scales = scales

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [...]`` to ``[..., hidden]``."""
        return self.codes[ids].to(self.scales.dtype) * self.scales[ids].unsqueeze(-1)


def int8_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` float as int8 codes ``[out, in]`` and scales ``[out]`` in ``dtype``. Each scale is
    rounded to ``dtype`` before the codes are computed with it, so the codes fit the scale the kernel uses."""
    scales = (weight.abs().amax(dim=1) / 127).to(dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(weight / scales.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def gguf_int4_groups(path: Path, hf_model: torch.nn.Module) -> dict[torch.nn.Module, Int4Groups]:
    """:func:`read_gguf_int4_groups`, through the cache (kind ``int4-groups``, keyed by the file's
    fingerprint and the versions of quickdraft and transformers): parsing a GGUF file is slow."""
    from safetensors.torch import load_file, save_file

    from quickdraft import cache

    key = cache.source_key(path)
    modules = dict(hf_model.named_modules())
    names = {module: name for name, module in modules.items()}

    def write(folder: Path) -> None:
        found = read_gguf_int4_groups(path, hf_model)
        save_file({f"{names[m]}.{part}": tensor for m, groups in found.items()
                   for part, tensor in _stored(groups).items()}, folder / "groups.safetensors")

    def read(folder: Path) -> dict[torch.nn.Module, Int4Groups]:
        tensors = load_file(folder / "groups.safetensors")
        prefixes = {name.rsplit(".", 1)[0] for name in tensors}
        return {modules[p]: _restored({part: tensors[f"{p}.{part}"] for part in ("codes", "scales", "zeros")})
                for p in prefixes}

    return cache.cached("int4-groups", key, write, read, label=f"{path.name} int4 groups")


def _stored(groups: Int4Groups) -> dict[str, torch.Tensor]:
    """Groups as tensors to save, two codes per byte (even column in the low nibble)."""
    codes = groups.codes
    return {"codes": (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), "scales": groups.scales,
            "zeros": groups.zeros}


def _restored(parts: dict[str, torch.Tensor]) -> Int4Groups:
    """The inverse of :func:`_stored`."""
    packed = parts["codes"]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return Int4Groups(codes, parts["scales"], parts["zeros"])


def read_gguf_int4_groups(path: Path, hf_model: torch.nn.Module) -> dict[torch.nn.Module, Int4Groups]:
    """The int4 groups of the GGUF file's Q4_0 / Q4_1 / Q4_K tensors, by the ``torch.nn.Linear`` of
    ``hf_model`` (loaded from that file) they became. Tensor names are mapped, and rows reordered, as
    transformers' GGUF loader does (for Llama it un-permutes the q and k rows that llama.cpp permutes for its
    rotary layout). A tensor whose mapped rows do not reproduce the loaded float weights is left out (it
    becomes int8) with a warning."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    reader = GGUFReader(path)
    config = hf_model.config
    processor = TENSOR_PROCESSORS.get(read_field(reader, "general.architecture")[0], TensorProcessor)(
        config={"num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads})
    names = get_gguf_hf_weights_map(hf_model, processor)
    modules = dict(hf_model.named_modules())
    groups = {}
    for tensor in reader.tensors:
        module = modules.get(names.get(tensor.name, "").removesuffix(".weight"))
        if tensor.tensor_type not in INT4_TYPES or not isinstance(module, torch.nn.Linear):
            continue
        found = int4_groups(np.asarray(tensor.data), tensor.tensor_type)
        found = found.permuted(_row_order(processor, tensor.name, found.shape[0]))
        if _matches(found, module.weight):
            groups[module] = found
        else:
            log.warning("GGUF tensor %s does not map onto %s row for row; it is held as int8", tensor.name,
                        names[tensor.name])
    return groups


def _row_order(processor: object, name: str, rows: int) -> torch.Tensor:
    """The row permutation transformers' GGUF ``processor`` applies to tensor ``name``: its output row ``i``
    is input row ``order[i]``."""
    index = np.arange(rows).reshape(rows, 1)
    order = processor.process(weights=index, name=name).weights.reshape(-1)
    return torch.from_numpy(np.ascontiguousarray(order))


def _matches(groups: Int4Groups, weight: torch.Tensor, rows: int = 64) -> bool:
    """Whether the first ``rows`` rows of ``groups`` equal the loaded float ``weight``'s, to float32 rounding
    of the group arithmetic (Q4_K's zero ``8 d sc - dmin mn`` is not always exact in float32)."""
    dense = weight.detach()[:rows].float()
    mine = Int4Groups(groups.codes[:rows], groups.scales[:rows], groups.zeros[:rows]).dequantize()
    return mine.shape == dense.shape and torch.allclose(mine, dense, rtol=1e-6, atol=1e-7)


def cached_fastest_mode(path: Path, hf_model: torch.nn.Module, groups: Callable[[], Groups],
                        quantized_dtype: torch.dtype, dense_dtype: torch.dtype) -> str:
    """:func:`fastest_mode` of the file's int4 ``groups`` (read by calling it; none: ``dense``), through the
    cache (kind ``weights-choice``, keyed by the model file's fingerprint, the dtypes and
    :func:`quickdraft.cache.machine_key`): measured on the first load on a machine, read after.
    ``quickdraft cache clear`` measures again."""
    import json

    from quickdraft import cache

    key = {**cache.source_key(path), **cache.machine_key("cpu"), "quantized_dtype": str(quantized_dtype),
           "dense_dtype": str(dense_dtype), "timed": "layers within AUTO_BYTES"}

    def write(folder: Path) -> None:
        found = groups()
        mode, costs = fastest_mode(hf_model, found, quantized_dtype, dense_dtype) if found else ("dense", {})
        (folder / "choice.json").write_text(json.dumps({"mode": mode, "seconds": costs}))

    def read(folder: Path) -> str:
        mode = json.loads((folder / "choice.json").read_text())["mode"]
        if mode not in ("dense", "int4"):
            raise ValueError(f"unknown weights choice {mode!r}")
        return mode

    return cache.cached("weights-choice", key, write, read, label=f"{path.name} weights auto")


def fastest_mode(hf_model: torch.nn.Module, groups: dict[torch.nn.Module, Int4Groups],
                 quantized_dtype: torch.dtype, dense_dtype: torch.dtype) -> tuple[str, dict[str, float]]:
    """``dense`` or ``int4``: which runs the decoder layers' linears and the output layer faster, summed over
    :data:`AUTO_ROWS` rows, and the seconds of each. The layers timed are as many as fit in
    :data:`AUTO_BYTES` of dense weights (all of a small model's): as in a forward, each product then reads
    its weights from memory, not from the cache where the previous call left them (timing one layer over and
    over measured int4 and dense bfloat16 alike on an AMX CPU, where a whole forward runs int4 twice as fast).
    The two are timed in turns, best of several rounds, so that load from elsewhere on the machine slows both
    alike instead of whichever ran during it."""
    stacks = [*_timed_layer_stacks(hf_model, dense_dtype), [hf_model.lm_head]]
    widths = [stack[0].in_features for stack in stacks]
    quantized = QuantizedWeights(quantized_dtype, groups)
    candidates = {
        "dense": ([FusedLinear([_cast_linear(m, dense_dtype) for m in stack]) for stack in stacks], dense_dtype),
        "int4": ([quantized.linear(stack) for stack in stacks], quantized_dtype),
    }
    best = {mode: float("inf") for mode in candidates}
    for _ in range(AUTO_ROUNDS):
        for mode, (linears, dtype) in candidates.items():
            best[mode] = min(best[mode], _cost(linears, widths, dtype))
    log.info("weights auto: seconds for %d linears and the output layer at rows %s: %s", len(stacks) - 1,
             AUTO_ROWS, best)
    return min(best, key=best.get), best


def _timed_layer_stacks(hf_model: torch.nn.Module, dtype: torch.dtype) -> list[list[torch.nn.Linear]]:
    """The decoder layers' linears, fused as the native forward fuses them, from the first layer on while
    their weights in ``dtype`` fit in :data:`AUTO_BYTES` (at least one layer)."""
    stacks: list[list[torch.nn.Linear]] = []
    size = 0
    for layer in hf_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        own = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
               [mlp.down_proj]]
        size += sum(m.weight.numel() for stack in own for m in stack) * dtype.itemsize
        if stacks and size > AUTO_BYTES:
            break
        stacks.extend(own)
    return stacks


def _cost(linears: list[StackedLinear], widths: list[int], dtype: torch.dtype) -> float:
    """Seconds for one call of each of ``linears`` (input widths ``widths``) at each of :data:`AUTO_ROWS`
    rows."""
    total = 0.0
    for rows in AUTO_ROWS:
        inputs = [torch.randn(1, rows, width, dtype=dtype) for width in widths]
        start = time.perf_counter()
        for linear, x in zip(linears, inputs):
            linear(x, True)
        total += time.perf_counter() - start
    return total


def _cast_linear(module: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Linear:
    """A stand-in layer with ``module``'s weight and bias in ``dtype`` (for timing)."""
    copy = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
    copy.weight = torch.nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    if module.bias is not None:
        copy.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return copy


def resident_bytes() -> int:
    """This process's resident memory in bytes (``VmRSS`` of /proc/self/status; 0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x [..., rows, in]`` as the 2-D ``[rows', in]`` the kernels take."""
    return x.reshape(-1, x.shape[-1])


def _shaped(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's ``out [rows', out]`` back in ``x``'s leading shape, plus ``bias``."""
    out = out.view(*x.shape[:-1], out.shape[-1])
    return out if bias is None else out + bias


def _release(module: torch.nn.Module) -> None:
    """Replace ``module``'s weight by an empty tensor and make calling the module raise, saying why."""
    module.weight = torch.nn.Parameter(module.weight.new_empty(0), requires_grad=False)
    module.register_forward_pre_hook(_released)


def _released(module: torch.nn.Module, args: tuple) -> None:
    raise RuntimeError(f"this {type(module).__name__}'s weight was packed into quantized form for quickdraft's "
                       "native forward and freed; run the model through the engine's target")


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system (``malloc_trim``), so that the float weights just
    freed leave the resident size; nothing where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _cast_parameters(hf_model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``hf_model``'s floating-point parameters (not its buffers: the rotary frequencies stay float32,
    as ``from_pretrained(dtype=...)`` leaves them) to ``dtype``."""
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
