"""The native forward for the Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3), built for speculation.

:class:`NativeCausalLM` reuses the small modules (RMSNorm, rotary embedding, q/k norms) of the loaded
transformers model and holds its linear layers' weights fused where they read the same input (q/k/v,
gate/up), in the form a :class:`~quickdraft.models.layouts.WeightHolder` gives them (dense and, on CPU where
oneDNN can, prepacked: :mod:`quickdraft.models.layouts`; int8/int4: :mod:`quickdraft.models.quantized`). It
orchestrates the forward itself so that it can

- keep keys and values in a :class:`~quickdraft.kv.StaticKVCache` (O(1) rollback, in-place compaction),
- run a forward over a token tree with per-node positions and a tree attention mask,
- return hidden states of chosen layers, and skip chosen layers per call (no shared state is mutated),
- run several sequences in one forward (:meth:`NativeCausalLM.forward_batch`): each batch row is one sequence
  with its own cache length (ragged) and its own write slots.

Every forward with a mask (every forward after the prompt's first one) and every one-token forward is
*row-exact*, computed by the rules of :mod:`quickdraft.models.row_exact`. Sequences, draft-tree layout and
batched verification: :mod:`quickdraft.models.native_session`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from quickdraft.kv import StaticKVCache
from quickdraft.models.base import ForwardOutput, TargetModel
from quickdraft.models.layouts import DenseWeights, StackedLinear, WeightHolder
from quickdraft.models.native_session import NativeSession, Placement
from quickdraft.models.row_exact import attention_call, attention_mask, chunked_attention, whole_blocks

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
        """A cache of at least ``max_len`` slots per row, rounded up to whole key blocks
        (:func:`~quickdraft.models.row_exact.whole_blocks`)."""
        return StaticKVCache(
            self.num_layers, batch, self.num_kv_heads, whole_blocks(max_len), self.head_dim, self.dtype,
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
        rotation = Rotation.of(*self.rotary(hidden, positions.to(self.device)))
        row_exact = mask is not None or input_ids.shape[1] == 1
        place = Placement.of(cache, start, input_ids.shape, rows, row_exact)
        attn_mask = None
        if row_exact:
            attn_mask = attention_mask(mask, input_ids.shape, place.end, place.span, self.dtype, self.query_group,
                                       self.device)
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if index not in skip_layers:
                hidden = self._decoder_layer(layer, index, hidden, rotation, cache, place, attn_mask)
            if index in hidden_layers:
                collected[index] = hidden
        normed = self.final_norm(hidden[:, logit_rows])
        if -1 in hidden_layers:
            collected[-1] = normed
        return BatchForwardOutput(self.output_projection(normed, place.row_exact).float(), collected)

    def _decoder_layer(self, layer, index, hidden, rotation, cache, place, attn_mask) -> torch.Tensor:
        linears = self.layer_linears[index]
        residual = hidden
        attended = self._attention(layer.self_attn, linears, layer.input_layernorm(hidden), index, rotation, cache,
                                   place, attn_mask)
        hidden = residual + attended
        gate, up = linears.gate_up(layer.post_attention_layernorm(hidden), place.row_exact)
        return hidden + linears.down(F.silu(gate) * up, place.row_exact)

    def _attention(self, attn, linears, x, index, rotation, cache, place, attn_mask) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self._rotated_qkv(attn, linears.qkv.whole(x, place.row_exact), rotation)
        if place.slots is None:
            cache.write(index, k, v, place.start, place.rows)
        else:
            cache.write_ragged(index, k, v, place.slots)
        if place.row_exact:
            keys, values = cache.read(index, place.span, place.rows)
            out = chunked_attention(q, keys, values, attn_mask, self.query_group)
        elif place.end > length:
            raise ValueError("a causal forward over several tokens on a non-empty cache needs an explicit mask")
        else:
            keys, values = cache.read(index, place.end, place.rows)
            out = attention_call(q, keys, values, None, True)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return linears.o(out, place.row_exact)

    def _rotated_qkv(self, attn, qkv: torch.Tensor, rotation: Rotation) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values ``[B, heads, T, head_dim]`` from the fused product ``qkv [B, T, (heads +
        2 kv_heads) * head_dim]``, queries and keys rotated (in one call where no q/k norm comes first)."""
        batch, length, _ = qkv.shape
        heads = qkv.view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        query_key = heads[:, :, : self.num_heads + self.num_kv_heads]
        if getattr(attn, "q_norm", None) is not None:
            query_key = torch.cat([attn.q_norm(query_key[:, :, : self.num_heads]),
                                   attn.k_norm(query_key[:, :, self.num_heads :])], dim=2)
        query_key = rotation.apply(query_key)
        q, k = query_key[:, :, : self.num_heads], query_key[:, :, self.num_heads :]
        v = heads[:, :, self.num_heads + self.num_kv_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


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
class Rotation:
    """The rotary embedding of one forward's positions, applied to queries and keys together: ``x * cos +
    rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]`` (the halves of the last dimension), computed as
    ``x * cos + [x2, x1] * signed_sin`` with ``signed_sin = [-sin1, sin2]``, which rounds the same (a sign is
    exact). ``cos``, ``signed_sin``: ``[B, T, 1, head_dim]``."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rotation:
        """From the rotary module's ``cos``, ``sin`` ``[B, T, head_dim]``."""
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cls(cos.unsqueeze(2), signed.unsqueeze(2))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, heads, head_dim]`` rotated."""
        swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
        return x * self.cos + swapped * self.signed_sin
