"""GGUF 4-bit weight blocks read as affine int4 groups of 32, without changing a single weight.

An *int4 group* is 32 consecutive weights of one row (along the input dimension) stored as codes ``q`` in
0..15 with one ``scale`` and one ``zero``: ``w = scale * (q - 8) + zero``, the form PyTorch's CPU int4 kernel
(``torch._weight_int4pack_mm_for_cpu``) reads. GGUF's 4-bit block types are each such groups:

- Q4_0 (blocks of 32: fp16 ``d``, 16 bytes of codes): ``w = d * (q - 8)``, so scale ``d`` and zero 0;
- Q4_1 (blocks of 32: fp16 ``d`` and ``m``, 16 bytes of codes): ``w = d * q + m``, so scale ``d`` and zero
  ``m + 8 d``;
- Q4_K (super-blocks of 256: fp16 ``d`` and ``dmin``, 12 bytes of 6-bit sub-block scales ``sc`` and mins
  ``mn``, 128 bytes of codes): each of the 8 sub-blocks of 32 is ``w = (d sc) q - dmin mn``, so scale ``d sc``
  and zero ``8 d sc - dmin mn``.

In a block of 32 codes, byte ``j`` of the 16 code bytes holds weight ``j`` in its low nibble and weight
``j + 16`` in its high nibble; in Q4_K, the 128 code bytes are four runs of 32 bytes, run ``r`` holding
sub-block ``2r`` in the low nibbles and sub-block ``2r + 1`` in the high ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K

GROUP = 32
INT4_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K})
_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q4_K: 144}


@dataclass(frozen=True)
class Int4Groups:
    """A weight matrix ``[rows, columns]`` as int4 groups of :data:`GROUP` columns:
    ``w[r, c] = scales[r, c // 32] * (codes[r, c] - 8) + zeros[r, c // 32]``.

    ``codes [rows, columns]`` uint8 in 0..15; ``scales``, ``zeros [rows, columns / 32]`` float32."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weights ``[rows, columns]`` these groups stand for."""
        rows, columns = self.codes.shape
        grouped = (self.codes.view(rows, -1, GROUP).float() - 8) * self.scales[..., None] + self.zeros[..., None]
        return grouped.view(rows, columns)

    def permuted(self, order: torch.Tensor) -> Int4Groups:
        """The same groups with rows reordered: row ``i`` of the result is row ``order[i]`` of these."""
        return Int4Groups(self.codes[order], self.scales[order], self.zeros[order])

    @staticmethod
    def stacked(parts: Sequence[Int4Groups]) -> Int4Groups:
        """Several matrices of the same width, their rows one after the other."""
        return Int4Groups(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                          torch.cat([p.zeros for p in parts]))


def int4_groups(raw: np.ndarray, qtype: GGMLQuantizationType) -> Int4Groups:
    """The int4 groups of a GGUF tensor's raw bytes ``raw [rows, bytes per row]`` of type ``qtype`` (one of
    :data:`INT4_TYPES`)."""
    if qtype not in INT4_TYPES:
        raise ValueError(f"{qtype.name} blocks are not int4 groups; expected one of Q4_0, Q4_1, Q4_K")
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(-1, _BLOCK_BYTES[qtype])
    codes, scales, zeros = _DECODERS[qtype](blocks)
    return Int4Groups(torch.from_numpy(codes.reshape(rows, -1)), torch.from_numpy(scales.reshape(rows, -1)),
                      torch.from_numpy(zeros.reshape(rows, -1)))


def _fp16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 number at byte ``offset`` of each block ``[n, bytes]``, as float32 ``[n]``."""
    return blocks[:, offset:offset + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(code_bytes: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes to ``[..., 32]`` codes: the low nibbles, then the high nibbles."""
    return np.concatenate([code_bytes & 0x0F, code_bytes >> 4], axis=-1)


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _fp16(blocks, 0)
    return _nibbles(blocks[:, 2:]), d, np.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, m = _fp16(blocks, 0), _fp16(blocks, 2)
    return _nibbles(blocks[:, 4:]), d, m + 8 * d


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, dmin = _fp16(blocks, 0)[:, None], _fp16(blocks, 2)[:, None]
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)
    runs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (runs & 0x0F).reshape(-1, 8 * GROUP)
    return codes, scale, 8 * scale - dmin * mn.astype(np.float32)


_DECODERS = {GGMLQuantizationType.Q4_0: _q4_0, GGMLQuantizationType.Q4_1: _q4_1, GGMLQuantizationType.Q4_K: _q4_k}
