"""The row-exact numerics of the native forward's attention.

A forward is *row-exact* when each of its rows is computed, bit for bit, as a one-token decoding step would
compute it. Every forward of :class:`~quickdraft.models.native.NativeCausalLM` with a mask (every forward
after the prompt's first one) and every one-token forward is computed by these rules, and is then row-exact
for each row whose visible keys sit in consecutive cache slots: a chain, and in a tree the path of first
children, which :class:`~quickdraft.models.native_session.DepthFirstLayout` lays out consecutively. A row
after a gap in its path may still round differently. The rules, each removing one way in which the CPU
kernels sum a row in another order than a one-row call would:

- attention reads the cache in whole blocks of :data:`KEY_BLOCK` slots, the slots past a forward's keys
  hidden by the mask (:func:`whole_blocks`, :func:`attention_mask`): the attention kernel's summation order
  changes when the number of keys crosses a multiple of 16;
- attention takes at most :data:`QUERY_ROWS` query rows per call, counted after folding
  (:func:`chunked_attention`): in a larger call a row's output depends on the other rows of the call;
- linears multiply at most ``ROW_INVARIANT_ROWS`` rows at a time (:mod:`quickdraft.models.layouts`).

On CPU a lone query row is computed as the first of two equal rows (:func:`attention_call`): the attention
kernel's path for one query row is slower than its path for two.

*Folding*: with grouped-query attention, the ``query_group = heads / kv_heads`` query heads that share a kv
head are computed as one head of ``query_group * T`` query rows (:func:`grouped_attention`): the same
products in fewer, larger attention calls. The mask is then repeated once per query head of a group.

The masks are additive (0 where a row may attend, ``-inf`` elsewhere) and made once per forward: given a
boolean mask, the attention call would convert it again in every layer.

The measurements behind these rules are in ``results/native-forward.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KEY_BLOCK = 16
QUERY_ROWS = 60


def whole_blocks(slots: int) -> int:
    """``slots`` rounded up to whole :data:`KEY_BLOCK` blocks."""
    return -(-slots // KEY_BLOCK) * KEY_BLOCK


def attention_mask(mask: torch.Tensor | None, shape: torch.Size, end: int, span: int, dtype: torch.dtype,
                   query_group: int, device: torch.device) -> torch.Tensor:
    """The additive mask ``[B, 1, query_group * T, span]`` of a row-exact forward's attention calls, on
    ``device``, in the folded layout of :func:`grouped_attention`: ``mask [B, T, end]`` (True = may attend;
    None: every row sees all ``end`` slots) widened to ``span`` slots (:func:`whole_blocks`), the slots past
    ``end`` hidden, and repeated once per query head of a group."""
    folded = additive_block_mask(mask, shape, end, span, dtype)
    return folded.to(device).unsqueeze(1).repeat(1, 1, query_group, 1)


def additive_block_mask(mask: torch.Tensor | None, shape: torch.Size, end: int, span: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``mask [B, T, end]`` (True = may attend; None: every row sees all ``end`` slots) widened to ``[B, T,
    span]`` with the slots past ``end`` hidden, as the additive mask attention adds to its scores (0 or
    -inf)."""
    batch, count = shape
    visible = torch.zeros(batch, count, span, dtype=torch.bool)
    visible[:, :, :end] = True if mask is None else mask
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def chunked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor,
                      query_group: int) -> torch.Tensor:
    """Masked attention of ``q [B, heads, T, head_dim]`` (:func:`grouped_attention`) in calls of at most
    :data:`QUERY_ROWS` folded query rows; ``attn_mask`` from :func:`attention_mask`."""
    length = q.shape[2]
    chunk = max(1, QUERY_ROWS // query_group)
    if length <= chunk:
        return grouped_attention(q, keys, values, attn_mask, False, query_group)
    grouped = attn_mask.unflatten(2, (query_group, length))
    parts = [
        grouped_attention(q[:, :, first:first + chunk], keys, values,
                          grouped[:, :, :, first:first + chunk].flatten(2, 3), False, query_group)
        for first in range(0, length, chunk)
    ]
    return torch.cat(parts, dim=2)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None,
                      causal: bool, query_group: int) -> torch.Tensor:
    """Attention of queries ``q [B, heads, T, head_dim]`` over ``keys``/``values [B, kv_heads, S,
    head_dim]``, folded (module docstring) where there is no causal flag and ``query_group > 1``;
    ``attn_mask [B, 1, query_group * T, S]`` (:func:`attention_mask`) or None."""
    batch, heads, length, head_dim = q.shape
    if causal or query_group == 1:
        return attention_call(q, keys, values, attn_mask, causal)
    folded = q.reshape(batch, keys.shape[1], query_group * length, head_dim)
    return attention_call(folded, keys, values, attn_mask, False).reshape(batch, heads, length, head_dim)


def attention_call(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None,
                   causal: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, a lone query row on CPU computed as the first of two equal rows
    (module docstring)."""
    single = q.shape[2] == 1 and q.device.type == "cpu"
    if single:
        q = torch.cat([q, q], dim=2)
        attn_mask = None if attn_mask is None else torch.cat([attn_mask, attn_mask], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=causal,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, :1] if single else out
