"""Reading int4 codes back out of the layout ``torch._convert_weight_to_int4pack_for_cpu`` packs them in.

The int4 kernel (``torch._weight_int4pack_mm_for_cpu``) is fast for a few rows but computes every row on its
own, so a prompt's first forward over hundreds of tokens costs hundreds of one-row products (about 19 times
a bfloat16 product with the dequantized weights on an AMX CPU, 1000 rows of a 3072 x 576 layer). For such
wide products :mod:`quickdraft.models.quantized` dequantizes one layer's weights at a time from the packed
codes (no second copy of the codes is kept) and multiplies densely.

The packed layout depends on the CPU (PyTorch's ``weight_to_int4pack_kernel``): rows are taken in blocks of
``B`` (64 with AVX-512, 32 with AVX2), stored as ``[N / B, K, B / 2]`` bytes whose low nibbles hold rows
``0 .. B/2 - 1`` of the block and whose high nibbles hold rows ``B/2 .. B - 1``. :func:`packed_block` finds
``B`` by packing random codes and reading them back; where no block size reads them back exactly (another
layout), or ``N`` is not a whole number of blocks (the tail block has another format), :func:`unpacked_codes`
returns None and callers keep the kernel.
"""

from __future__ import annotations

import functools

import torch

#: Block sizes the packing kernel uses: AVX-512 and AVX2 (also the non-vectorized build's).
CANDIDATE_BLOCKS = (64, 32)


@functools.cache
def packed_block() -> int | None:
    """The row block of this CPU's packed int4 layout (module docstring), or None where neither candidate
    reads random codes back exactly."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 128, 64
    codes = torch.randint(0, 16, (rows, columns), dtype=torch.int32, generator=generator)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in CANDIDATE_BLOCKS:
        if packed.shape == (rows, columns // 2) and torch.equal(_unpack(packed, rows, columns, block).int(), codes):
            return block
    return None


def unpacked_codes(packed: torch.Tensor, rows: int, columns: int) -> torch.Tensor | None:
    """The codes ``[rows, columns]`` (uint8, 0..15) packed in ``packed [rows, columns / 2]``, or None where
    this CPU's layout is not known or ``rows`` is not whole blocks of it."""
    block = packed_block()
    if block is None or rows % block:
        return None
    return _unpack(packed, rows, columns, block)


def _unpack(packed: torch.Tensor, rows: int, columns: int, block: int) -> torch.Tensor:
    by_block = packed.view(rows // block, columns, block // 2)
    nibbles = torch.cat([by_block & 15, by_block >> 4], dim=-1)  # [rows / block, columns, block]
    return nibbles.transpose(1, 2).reshape(rows, columns)
