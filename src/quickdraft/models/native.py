"""A native forward for the Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3) built for speculation.

It reuses the small modules (RMSNorm, rotary embedding, q/k norms) of the loaded transformers model and
holds its linear layers' weights fused and, on CPU in float32 (and in bfloat16 where the CPU computes it
natively), prepacked (:mod:`quickdraft.models.layouts`: a second copy of the weights in memory, for matmuls
about twice as fast at a few rows). It orchestrates the forward itself so that it can

- keep keys and values in a :class:`~quickdraft.kv.StaticKVCache` (O(1) rollback, in-place compaction),
- run a forward over a token tree with per-node positions and a tree attention mask,
- return hidden states of chosen layers, and skip chosen layers per call (no shared state is mutated),
- verify several sequences in one forward (:func:`verify_batch`): each batch row is one sequence with its own
  cache length (ragged), its own write slots and its own tree mask, rows padded to the same width.

Every forward after the prompt's first one is *row-exact*: each of its rows is computed, bit for bit, as a
one-token decoding step would compute it, as long as the row's visible keys sit in consecutive cache slots
(a chain; in a tree, the path of first children, which :meth:`NativeSession.verify` lays out consecutively).
In float32 (where rows used to differ in the last bits only) no output changes; in bfloat16 it keeps
speculative decoding on the text plain decoding writes far more often (rounding differences flip near-ties).
Besides that layout, three things make it so, each measured on an AMX Xeon in bfloat16 with PyTorch's CPU
attention kernel and oneDNN's prepacked linears:

- attention reads the cache in whole blocks of :data:`KEY_BLOCK` slots, the slots past a row's keys masked
  out: the kernel sums a row's scores in another order once the number of keys crosses a multiple of 16;
- attention takes at most :data:`QUERY_ROWS` query rows per call (20 tokens with three query heads folded
  per kv head): from 64 rows on (22 tokens), a row's output depends on the other rows of the call;
- linears multiply at most ``ROW_INVARIANT_ROWS`` rows at a time (:mod:`quickdraft.models.layouts`).

Measured on the embedded model (bfloat16, 8 Spec-Bench prompts, verification rows vs the logits of one-token
decoding): without these, 78% of chain rows and 92% of tree rows differed; with them, no chain row and no
first-child-path row of trees up to 93 nodes differs, and rows after a gap still do (about half of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from quickdraft.kv import StaticKVCache
from quickdraft.models.base import HIDDEN_STATES, LAYER_SKIP, TREE, ForwardOutput, TargetModel, TargetSession
from quickdraft.models.layouts import DenseWeights, StackedLinear, WeightHolder
from quickdraft.tree import (
    depth_first_order,
    reordered,
    verification_mask,
    verification_positions,
    verification_tokens,
)
from quickdraft.types import DraftTree

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
KEY_BLOCK = 16
QUERY_ROWS = 60


def attention_span(config: Any) -> int:
    """The longest context the native forward computes exactly: the position limit, or the sliding window
    where the model has one (the native forward attends to the whole cache, so it stops at the window)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return config.max_position_embeddings
    return min(config.max_position_embeddings, window)


class NativeCausalLM(TargetModel):
    """Wraps a loaded transformers Llama-family model; see the module docstring."""

    def __init__(self, hf_model: torch.nn.Module, weights: WeightHolder | None = None) -> None:
        """``weights``: how the linears and the embedding hold their weights (default :class:`DenseWeights`;
        :class:`~quickdraft.models.quantized.QuantizedWeights` for int8/int4), which may free the transformers
        model's own copies once it has taken them."""
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"native forward supports {sorted(SUPPORTED_MODEL_TYPES)}, not {config.model_type}")
        self.hf_model = hf_model
        self.config = config
        self.layers = hf_model.model.layers
        self.final_norm = hf_model.model.norm
        self.device = hf_model.lm_head.weight.device
        holder = weights or DenseWeights()
        table = hf_model.model.embed_tokens
        self.output_projection = holder.linear([hf_model.lm_head])
        self.layer_linears = [_LayerLinears.of(layer, holder) for layer in self.layers]
        self.embed_tokens = holder.embedding(table, self.output_projection, hf_model.lm_head.weight is table.weight)
        holder.release(hf_model)
        self.dtype = self.final_norm.weight.dtype
        self.rotary = hf_model.model.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.query_group = self.num_heads // self.num_kv_heads
        self.vocab_size = config.vocab_size
        self.max_context = attention_span(config)
        self.num_layers = config.num_hidden_layers

    def new_session(self, max_len: int) -> NativeSession:
        return NativeSession(self, max_len)

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        """A cache of at least ``max_len`` slots per row, rounded up to whole :data:`KEY_BLOCK` blocks."""
        return StaticKVCache(
            self.num_layers, batch, self.num_kv_heads, _whole_blocks(max_len), self.head_dim, self.dtype,
            self.device,
        )

    def forward(self, *args: Any, **kwargs: Any) -> ForwardOutput:
        """:meth:`forward_batch` (same arguments) for batch row 0 only."""
        out = self.forward_batch(*args, **kwargs)
        return ForwardOutput(out.logits[0], {layer: value[0] for layer, value in out.hidden.items()})

    @torch.inference_mode()
    def forward_batch(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StaticKVCache,
        start: int | list[int],
        mask: torch.Tensor | None,
        skip_layers: frozenset[int] = frozenset(),
        hidden_layers: tuple[int, ...] = (),
        logit_rows: slice = slice(None),
        rows: slice | None = None,
    ) -> BatchForwardOutput:
        """Run ``input_ids [B, T]`` at ``positions [B, T]``, writing keys/values at cache slots
        ``start .. start + T``; ``start`` may be a list, then batch row ``b`` writes at slots
        ``start[b] .. start[b] + T`` of its cache row (ragged). ``mask [B, T, max(start) + T]`` (True = may
        attend) or None for causal attention. Logits are computed for ``logit_rows`` of the T rows only.
        ``rows``: the cache rows the batch occupies (default: all of them)."""
        hidden = self.embed_tokens(input_ids.to(self.device))
        cos, sin = self.rotary(hidden, positions.to(self.device))
        row_exact = mask is not None or input_ids.shape[1] == 1
        place = _Placement.of(cache, start, input_ids.shape, rows, row_exact)
        attn_mask = None
        if row_exact:
            attn_mask = _additive_block_mask(mask, input_ids.shape, place.end, place.span, self.dtype)
            attn_mask = attn_mask.to(self.device).unsqueeze(1).repeat(1, 1, self.query_group, 1)
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if index not in skip_layers:
                hidden = self._decoder_layer(layer, index, hidden, cos, sin, cache, place, attn_mask)
            if index in hidden_layers:
                collected[index] = hidden
        normed = self.final_norm(hidden[:, logit_rows])
        if -1 in hidden_layers:
            collected[-1] = normed
        return BatchForwardOutput(self.output_projection(normed, place.row_exact).float(), collected)

    def _decoder_layer(self, layer, index, hidden, cos, sin, cache, place, attn_mask) -> torch.Tensor:
        linears = self.layer_linears[index]
        residual = hidden
        attended = self._attention(layer.self_attn, linears, layer.input_layernorm(hidden), index, cos, sin, cache,
                                   place, attn_mask)
        hidden = residual + attended
        gate, up = linears.gate_up(layer.post_attention_layernorm(hidden), place.row_exact)
        return hidden + linears.down(F.silu(gate) * up, place.row_exact)

    def _attention(self, attn, linears, x, index, cos, sin, cache, place, attn_mask) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = linears.qkv(x, place.row_exact)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        if place.slots is None:
            cache.write(index, k, v, place.start, place.rows)
        else:
            cache.write_ragged(index, k, v, place.slots)
        if place.row_exact:
            keys, values = cache.read(index, place.span, place.rows)
            out = self._chunked_attention(q, keys, values, attn_mask)
        elif place.end > length:
            raise ValueError("a causal forward over several tokens on a non-empty cache needs an explicit mask")
        else:
            keys, values = cache.read(index, place.end, place.rows)
            out = self._scaled_dot_product(q, keys, values, None, True)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return linears.o(out, place.row_exact)

    def _chunked_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           attn_mask: torch.Tensor) -> torch.Tensor:
        """Masked attention of ``q [B, heads, T, head_dim]``, at most :data:`QUERY_ROWS` folded query rows
        (:meth:`_scaled_dot_product`) per call."""
        length = q.shape[2]
        chunk = max(1, QUERY_ROWS // self.query_group)
        if length <= chunk:
            return self._scaled_dot_product(q, keys, values, attn_mask, False)
        grouped = attn_mask.unflatten(2, (self.query_group, length))
        parts = [
            self._scaled_dot_product(q[:, :, first:first + chunk], keys, values,
                                     grouped[:, :, :, first:first + chunk].flatten(2, 3), False)
            for first in range(0, length, chunk)
        ]
        return torch.cat(parts, dim=2)

    def _scaled_dot_product(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            attn_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Attention of queries ``q [B, heads, T, head_dim]`` over ``keys``/``values [B, kv_heads, S,
        head_dim]``; ``attn_mask [B, 1, query_group * T, S]`` is :meth:`forward_batch`'s mask repeated once
        per query head of a group.

        With grouped-query attention and no causal flag, the ``query_group = heads / kv_heads`` query heads
        that share a kv head are folded into one head of ``query_group * T`` query rows: the same products,
        in fewer and larger attention calls (about a quarter faster on CPU)."""
        batch, heads, length, head_dim = q.shape
        if causal or self.query_group == 1:
            return _attention_call(q, keys, values, attn_mask, causal)
        folded = q.reshape(batch, self.num_kv_heads, self.query_group * length, head_dim)
        return _attention_call(folded, keys, values, attn_mask, False).reshape(batch, heads, length, head_dim)


def _attention_call(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor | None,
                    causal: bool) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, with a lone query row computed as the first of two equal rows:
    PyTorch's CPU attention kernel takes a path for one query row that is about three times slower than for
    two (measured on AVX-512, bfloat16)."""
    single = q.shape[2] == 1 and q.device.type == "cpu"
    if single:
        q = torch.cat([q, q], dim=2)
        attn_mask = None if attn_mask is None else torch.cat([attn_mask, attn_mask], dim=2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=causal,
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, :1] if single else out


@dataclass(frozen=True)
class _LayerLinears:
    """A decoder layer's linears, fused where they read the same input."""

    qkv: StackedLinear
    o: StackedLinear
    gate_up: StackedLinear
    down: StackedLinear

    @classmethod
    def of(cls, layer: torch.nn.Module, weights: WeightHolder) -> _LayerLinears:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(weights.linear([attn.q_proj, attn.k_proj, attn.v_proj]), weights.linear([attn.o_proj]),
                   weights.linear([mlp.gate_proj, mlp.up_proj]), weights.linear([mlp.down_proj]))


@dataclass
class BatchForwardOutput:
    """Logits ``[B, T, V]`` of a batched forward and hidden states ``{layer: [B, T, hidden]}``."""

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Placement:
    """Where a forward's new keys and values go (one ``start`` for every row, or per-row ``slots``), and
    whether the forward is row-exact (see the module docstring)."""

    start: int
    end: int
    rows: slice | None
    row_exact: bool
    slots: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def span(self) -> int:
        """The cache slots a masked attention call reads: ``end`` rounded up to whole key blocks."""
        return _whole_blocks(self.end)

    @classmethod
    def of(cls, cache: StaticKVCache, start: int | list[int], shape: torch.Size, rows: slice | None,
           row_exact: bool) -> _Placement:
        batch, count = shape
        if isinstance(start, int):
            return cls(start, start + count, rows, row_exact)
        if len(start) != batch:
            raise ValueError(f"{len(start)} start positions for a batch of {batch} rows")
        if len(set(start)) == 1:
            return cls(start[0], start[0] + count, rows, row_exact)
        rows = rows if rows is not None else slice(0, batch)
        return cls(-1, max(start) + count, rows, row_exact, cache.ragged_slots(list(start), count, rows))


def _whole_blocks(slots: int) -> int:
    return -(-slots // KEY_BLOCK) * KEY_BLOCK


def _additive_block_mask(mask: torch.Tensor | None, shape: torch.Size, end: int, span: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """``mask [B, T, end]`` (True = may attend; None: every row sees all ``end`` slots) widened to ``[B, T,
    span]`` with the slots past ``end`` hidden, as the additive mask attention adds to its scores (0 or -inf).
    Made once per forward: given a boolean mask, the attention call would convert it in every layer (about 4
    microseconds of a 20-microsecond call for one token, measured in bfloat16)."""
    batch, count = shape
    visible = torch.zeros(batch, count, span, dtype=torch.bool)
    visible[:, :, :end] = True if mask is None else mask
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class NativeSession(TargetSession):
    """One sequence in a :class:`NativeCausalLM`: by default with its own static KV cache; given ``cache`` and
    ``row``, a view on one row of a shared multi-row cache (a server's batch)."""

    capabilities = frozenset({TREE, HIDDEN_STATES, LAYER_SKIP})

    def __init__(self, model: NativeCausalLM, max_len: int = 0, cache: StaticKVCache | None = None,
                 row: int = 0) -> None:
        self.model = model
        self._owns_cache = cache is None
        self.cache = model.new_cache(max_len) if cache is None else cache
        self.row = row
        self._verify_start = 0
        self._layout = _DepthFirstLayout.of(DraftTree.empty())

    @property
    def row(self) -> int:
        return self._row

    @row.setter
    def row(self, row: int) -> None:
        """Move the view to another cache row (the caller moves the entries: :meth:`StaticKVCache.move_row`)."""
        self._row = row
        self._rows = None if self._owns_cache else slice(row, row + 1)

    @property
    def shares_cache(self) -> bool:
        """Whether the session is a view on one row of a shared multi-row cache (a server's batch)."""
        return not self._owns_cache

    @property
    def cached_length(self) -> int:
        return self.cache.lengths[self._row]

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.cache.truncate(0, self._row)
        return self.extend(prompt_ids)

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` to the cache; return the logits ``[V]`` after the last of them."""
        start = self.cache.lengths[self._row]
        count = len(token_ids)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if start == 0 or count == 1 else _causal_mask(start, count).unsqueeze(0)
        out = self.model.forward(
            torch.tensor([token_ids]), positions, self.cache, start, mask, logit_rows=slice(-1, None),
            rows=self._rows,
        )
        self.cache.truncate(start + count, self._row)
        return out.logits[-1]

    def truncate(self, length: int) -> None:
        self.cache.truncate(length, self._row)

    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Logits (and ``hidden_layers``) of the root and every node of ``tree``, in the tree's node order; the
        forward itself lays the nodes out depth-first (:class:`_DepthFirstLayout`)."""
        start = self.cache.lengths[self._row]
        self._verify_start = start
        self._layout = layout = _DepthFirstLayout.of(tree)
        tokens, positions, tree_mask = layout.inputs(root, start)
        mask = _prefixed(tree_mask, start).unsqueeze(0) if tree.size else None
        out = self.model.forward(tokens.unsqueeze(0), positions.unsqueeze(0), self.cache, start, mask,
                                 hidden_layers=hidden_layers, rows=self._rows)
        return layout.restored(out)

    def commit(self, accepted_nodes: list[int]) -> None:
        keep = [0] + [self._layout.row(node) for node in accepted_nodes]
        self.cache.compact(self._verify_start, keep, self._row)

    def draft_forward(
        self, tokens: list[int], skip_layers: frozenset[int], hidden_layers: tuple[int, ...] = (), offset: int = 0
    ) -> ForwardOutput:
        start = self.cache.lengths[self._row] + offset
        count = len(tokens)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if count == 1 else _causal_mask(start, count).unsqueeze(0)
        return self.model.forward(
            torch.tensor([tokens]), positions, self.cache, start, mask, skip_layers, hidden_layers, rows=self._rows
        )

    def close(self) -> None:
        if self._owns_cache:
            self.cache = self.model.new_cache(1)
        else:
            self.cache.truncate(0, self._row)


def verify_batch(sessions: list[NativeSession], roots: list[int], trees: list[DraftTree],
                 hidden_layers: tuple[int, ...] = ()) -> list[ForwardOutput]:
    """Verify one tree per session in ONE forward; the sessions are views on consecutive rows of one shared
    cache, each with its own committed length. Row ``b`` of the forward is session ``b``'s root and tree,
    padded to the widest tree (padding rows attend only to themselves and are dropped); its mask lets it see
    its own committed prefix and its own ancestors in the tree, nothing else. Returns each session's
    :meth:`NativeSession.verify` output; :meth:`NativeSession.commit` then works per session as usual."""
    if not sessions:
        return []
    model, cache, first = sessions[0].model, sessions[0].cache, sessions[0].row
    for offset, session in enumerate(sessions):
        if session.cache is not cache or session.row != first + offset:
            raise ValueError("verify_batch needs views on consecutive rows of one shared cache")
    starts = [session.cached_length for session in sessions]
    width = 1 + max(tree.size for tree in trees)
    span = max(starts) + width
    batch = len(sessions)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, span, dtype=torch.bool)
    for b, (session, root, tree, start) in enumerate(zip(sessions, roots, trees, starts)):
        rows = tree.size + 1
        session._layout = layout = _DepthFirstLayout.of(tree)
        tokens[b, :rows], positions[b, :rows], mask[b, :rows, start : start + rows] = layout.inputs(root, start)
        positions[b, rows:] = start
        mask[b, :, :start] = True
        pad = torch.arange(rows, width)
        mask[b, pad, start + pad] = True
        session._verify_start = start
    out = model.forward_batch(tokens, positions, cache, starts, mask, hidden_layers=hidden_layers,
                              rows=slice(first, first + batch))
    results = []
    for b, (session, tree) in enumerate(zip(sessions, trees)):
        rows = tree.size + 1
        own = ForwardOutput(out.logits[b, :rows], {k: v[b, :rows] for k, v in out.hidden.items()})
        results.append(session._layout.restored(own))
    return results


@dataclass(frozen=True)
class _DepthFirstLayout:
    """A draft tree as a verification forward lays it out: its nodes in depth-first order, so that the path of
    first children (the drafter's best guess) sits in consecutive cache slots, where the forward computes it
    exactly as one-token decoding would (module docstring). ``rows[i]`` is the forward row of the tree's node
    ``i`` (row 0 is the root); None where depth-first order is the tree's own (chains, most prefix trees)."""

    tree: DraftTree
    rows: torch.Tensor | None

    @classmethod
    def of(cls, tree: DraftTree) -> _DepthFirstLayout:
        order = depth_first_order(tree)
        if order == list(range(tree.size)):
            return cls(tree, None)
        rows = torch.empty(tree.size, dtype=torch.long)
        rows[torch.tensor(order, dtype=torch.long)] = torch.arange(1, tree.size + 1)
        return cls(reordered(DraftTree(tree.tokens, tree.parents), order), rows)

    def inputs(self, root: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward's token ids and positions ``[N + 1]`` and the mask among its rows ``[N + 1, N + 1]``,
        the root at position ``start``."""
        return (verification_tokens(root, self.tree), verification_positions(start, self.tree),
                verification_mask(self.tree))

    def row(self, node: int) -> int:
        return node + 1 if self.rows is None else int(self.rows[node])

    def restored(self, out: ForwardOutput) -> ForwardOutput:
        """``out``'s rows (root first, then the laid-out nodes) back in the tree's node order."""
        if self.rows is None:
            return out
        index = torch.cat([torch.zeros(1, dtype=torch.long), self.rows]).to(out.logits.device)
        return ForwardOutput(out.logits[index], {layer: value[index] for layer, value in out.hidden.items()})


def _causal_mask(start: int, count: int) -> torch.Tensor:
    """``[count, start + count]``: every new row sees the cached prefix and the new rows up to itself."""
    return _prefixed(torch.ones(count, count, dtype=torch.bool).tril(), start)


def _prefixed(mask: torch.Tensor, start: int) -> torch.Tensor:
    """Prepend ``start`` always-visible cached columns to a square mask among new rows."""
    prefix = torch.ones(mask.shape[0], start, dtype=torch.bool)
    return torch.cat([prefix, mask], dim=1)
