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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from quickdraft.kv import StaticKVCache
from quickdraft.models.base import HIDDEN_STATES, LAYER_SKIP, TREE, ForwardOutput, TargetModel, TargetSession
from quickdraft.models.layouts import FusedLinear
from quickdraft.tree import verification_mask, verification_positions, verification_tokens
from quickdraft.types import DraftTree

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


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

    def __init__(self, hf_model: torch.nn.Module) -> None:
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"native forward supports {sorted(SUPPORTED_MODEL_TYPES)}, not {config.model_type}")
        self.hf_model = hf_model
        self.config = config
        self.layers = hf_model.model.layers
        self.embed_tokens = hf_model.model.embed_tokens
        self.final_norm = hf_model.model.norm
        self.output_projection = FusedLinear([hf_model.lm_head])
        self.layer_linears = [_LayerLinears.of(layer) for layer in self.layers]
        self.rotary = hf_model.model.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.query_group = self.num_heads // self.num_kv_heads
        self.vocab_size = config.vocab_size
        self.max_context = attention_span(config)
        self.num_layers = config.num_hidden_layers
        self.device = hf_model.lm_head.weight.device
        self.dtype = hf_model.lm_head.weight.dtype

    def new_session(self, max_len: int) -> NativeSession:
        return NativeSession(self, max_len)

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        return StaticKVCache(
            self.num_layers, batch, self.num_kv_heads, max_len, self.head_dim, self.dtype, self.device
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
        attn_mask = None if mask is None else mask.to(self.device).unsqueeze(1).repeat(1, 1, self.query_group, 1)
        place = _Placement.of(cache, start, input_ids.shape, rows)
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if index not in skip_layers:
                hidden = self._decoder_layer(layer, index, hidden, cos, sin, cache, place, attn_mask)
            if index in hidden_layers:
                collected[index] = hidden
        normed = self.final_norm(hidden[:, logit_rows])
        if -1 in hidden_layers:
            collected[-1] = normed
        return BatchForwardOutput(self.output_projection(normed).float(), collected)

    def _decoder_layer(self, layer, index, hidden, cos, sin, cache, place, attn_mask) -> torch.Tensor:
        linears = self.layer_linears[index]
        residual = hidden
        attended = self._attention(layer.self_attn, linears, layer.input_layernorm(hidden), index, cos, sin, cache,
                                   place, attn_mask)
        hidden = residual + attended
        gate, up = linears.gate_up(layer.post_attention_layernorm(hidden))
        return hidden + linears.down(F.silu(gate) * up)

    def _attention(self, attn, linears, x, index, cos, sin, cache, place, attn_mask) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = linears.qkv(x)
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
        keys, values = cache.read(index, place.end, place.rows)
        causal = attn_mask is None and length > 1
        if causal and place.end > length:
            raise ValueError("a causal forward over several tokens on a non-empty cache needs an explicit mask")
        out = self._scaled_dot_product(q, keys, values, attn_mask, causal)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return linears.o(out)

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

    qkv: FusedLinear
    o: FusedLinear
    gate_up: FusedLinear
    down: FusedLinear

    @classmethod
    def of(cls, layer: torch.nn.Module) -> _LayerLinears:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(FusedLinear([attn.q_proj, attn.k_proj, attn.v_proj]), FusedLinear([attn.o_proj]),
                   FusedLinear([mlp.gate_proj, mlp.up_proj]), FusedLinear([mlp.down_proj]))


@dataclass
class BatchForwardOutput:
    """Logits ``[B, T, V]`` of a batched forward and hidden states ``{layer: [B, T, hidden]}``."""

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _Placement:
    """Where a forward's new keys and values go: one ``start`` for every row, or per-row ``slots``."""

    start: int
    end: int
    rows: slice | None
    slots: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, cache: StaticKVCache, start: int | list[int], shape: torch.Size, rows: slice | None) -> _Placement:
        batch, count = shape
        if isinstance(start, int):
            return cls(start, start + count, rows)
        if len(start) != batch:
            raise ValueError(f"{len(start)} start positions for a batch of {batch} rows")
        if len(set(start)) == 1:
            return cls(start[0], start[0] + count, rows)
        rows = rows if rows is not None else slice(0, batch)
        return cls(-1, max(start) + count, rows, cache.ragged_slots(list(start), count, rows))


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

    @property
    def row(self) -> int:
        return self._row

    @row.setter
    def row(self, row: int) -> None:
        """Move the view to another cache row (the caller moves the entries: :meth:`StaticKVCache.move_row`)."""
        self._row = row
        self._rows = None if self._owns_cache else slice(row, row + 1)

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
        start = self.cache.lengths[self._row]
        self._verify_start = start
        tokens = verification_tokens(root, tree).unsqueeze(0)
        positions = verification_positions(start, tree).unsqueeze(0)
        mask = _prefixed(verification_mask(tree), start).unsqueeze(0) if tree.size else None
        return self.model.forward(tokens, positions, self.cache, start, mask, hidden_layers=hidden_layers,
                                  rows=self._rows)

    def commit(self, accepted_nodes: list[int]) -> None:
        self.cache.compact(self._verify_start, [0] + [node + 1 for node in accepted_nodes], self._row)

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
        tokens[b, :rows] = verification_tokens(root, tree)
        positions[b, :rows] = verification_positions(start, tree)
        positions[b, rows:] = start
        mask[b, :, :start] = True
        mask[b, :rows, start : start + rows] = verification_mask(tree)
        pad = torch.arange(rows, width)
        mask[b, pad, start + pad] = True
        session._verify_start = start
    out = model.forward_batch(tokens, positions, cache, starts, mask, hidden_layers=hidden_layers,
                              rows=slice(first, first + batch))
    results = []
    for b, tree in enumerate(trees):
        rows = tree.size + 1
        results.append(ForwardOutput(out.logits[b, :rows], {k: v[b, :rows] for k, v in out.hidden.items()}))
    return results


def _causal_mask(start: int, count: int) -> torch.Tensor:
    """``[count, start + count]``: every new row sees the cached prefix and the new rows up to itself."""
    return _prefixed(torch.ones(count, count, dtype=torch.bool).tril(), start)


def _prefixed(mask: torch.Tensor, start: int) -> torch.Tensor:
    """Prepend ``start`` always-visible cached columns to a square mask among new rows."""
    prefix = torch.ones(mask.shape[0], start, dtype=torch.bool)
    return torch.cat([prefix, mask], dim=1)
