"""A native forward for the Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3) built for speculation.

It reuses the weights and small modules (RMSNorm, rotary embedding, q/k norms) of the loaded transformers
model, and orchestrates them itself so that it can

- keep keys and values in a :class:`~quickdraft.kv.StaticKVCache` (O(1) rollback, in-place compaction),
- run a forward over a token tree with per-node positions and a tree attention mask,
- return hidden states of chosen layers, and skip chosen layers per call (no shared state is mutated),
- optionally compute every linear layer *row-invariantly*: each row's result is the same whether a call
  has 1 row or 64, so verification reproduces plain decoding bit for bit in bfloat16 (see
  :func:`row_invariant_linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quickdraft.kv import StaticKVCache
from quickdraft.models.base import HIDDEN_STATES, LAYER_SKIP, TREE, ForwardOutput, TargetModel, TargetSession
from quickdraft.tree import verification_mask, verification_positions, verification_tokens
from quickdraft.types import DraftTree

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

#: Rows per call of :func:`row_invariant_linear`.
ROW_BLOCK = 16


def row_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` whose per-row result does not depend on how many rows the call has.

    CPU GEMM kernels block rows, and the reduction order for a row can differ between a 1-row call and a
    k-row call. Padding every call to whole blocks of ``ROW_BLOCK`` rows makes every row go through the
    same kernel path, at the price of computing up to ``ROW_BLOCK - 1`` padding rows."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    count = rows.shape[0]
    padded = -count % ROW_BLOCK
    if padded:
        rows = torch.cat([rows, rows.new_zeros(padded, rows.shape[1])])
    out = torch.cat([F.linear(block, weight, bias) for block in rows.split(ROW_BLOCK)])
    return out[:count].reshape(*shape[:-1], weight.shape[0])


class NativeCausalLM(TargetModel):
    """Wraps a loaded transformers Llama-family model; see the module docstring."""

    def __init__(self, hf_model: torch.nn.Module, row_invariant: bool = False) -> None:
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"native forward supports {sorted(SUPPORTED_MODEL_TYPES)}, not {config.model_type}")
        self.hf_model = hf_model
        self.config = config
        self.layers = hf_model.model.layers
        self.embed_tokens = hf_model.model.embed_tokens
        self.final_norm = hf_model.model.norm
        self.lm_head = hf_model.lm_head
        self.rotary = hf_model.model.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        self.num_layers = config.num_hidden_layers
        self.device = hf_model.lm_head.weight.device
        self.dtype = hf_model.lm_head.weight.dtype
        self.row_invariant = row_invariant
        self._linear = row_invariant_linear if row_invariant else F.linear

    def new_session(self, max_len: int) -> NativeSession:
        return NativeSession(self, max_len)

    def new_cache(self, max_len: int, batch: int = 1) -> StaticKVCache:
        return StaticKVCache(
            self.num_layers, batch, self.num_kv_heads, max_len, self.head_dim, self.dtype, self.device
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: StaticKVCache,
        start: int,
        mask: torch.Tensor | None,
        skip_layers: frozenset[int] = frozenset(),
        hidden_layers: tuple[int, ...] = (),
        logit_rows: slice = slice(None),
    ) -> ForwardOutput:
        """Run ``input_ids [B, T]`` at ``positions [B, T]``, writing keys/values at cache slots
        ``start .. start + T``. ``mask [B, T, start + T]`` (True = may attend) or None for causal
        attention. Logits are computed for ``logit_rows`` of the T rows only."""
        hidden = self.embed_tokens(input_ids.to(self.device))
        cos, sin = self.rotary(hidden, positions.to(self.device))
        attn_mask = None if mask is None else mask.to(self.device).unsqueeze(1)
        collected: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if index not in skip_layers:
                hidden = self._decoder_layer(layer, index, hidden, cos, sin, cache, start, attn_mask)
            if index in hidden_layers:
                collected[index] = hidden[0]
        normed = self.final_norm(hidden[:, logit_rows])
        if -1 in hidden_layers:
            collected[-1] = normed[0]
        logits = self._linear(normed, self.lm_head.weight, self.lm_head.bias)
        return ForwardOutput(logits[0].float(), collected)

    def _decoder_layer(self, layer, index, hidden, cos, sin, cache, start, attn_mask) -> torch.Tensor:
        residual = hidden
        attended = self._attention(layer.self_attn, layer.input_layernorm(hidden), index, cos, sin, cache, start, attn_mask)
        hidden = residual + attended
        return hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))

    def _attention(self, attn, x, index, cos, sin, cache, start, attn_mask) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self._linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, length, self.num_heads, self.head_dim)
        k = self._linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self._linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, length, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        cache.write(index, k, v, start)
        keys, values = cache.read(index, start + length)
        causal = attn_mask is None and length > 1
        if causal and start > 0:
            raise ValueError("a causal forward over several tokens on a non-empty cache needs an explicit mask")
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.num_kv_heads != self.num_heads
        )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self._linear(out, attn.o_proj.weight, attn.o_proj.bias)

    def _mlp(self, mlp, x) -> torch.Tensor:
        gate = self._linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = self._linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        return self._linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class NativeSession(TargetSession):
    """One sequence in a :class:`NativeCausalLM`, with its own static KV cache."""

    capabilities = frozenset({TREE, HIDDEN_STATES, LAYER_SKIP})

    def __init__(self, model: NativeCausalLM, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(max_len)
        self._verify_start = 0

    @property
    def cached_length(self) -> int:
        return self.cache.length

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.cache.reset()
        return self.extend(prompt_ids)

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` to the cache; return the logits ``[V]`` after the last of them."""
        start = self.cache.length
        count = len(token_ids)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if start == 0 or count == 1 else _causal_mask(start, count).unsqueeze(0)
        out = self.model.forward(
            torch.tensor([token_ids]), positions, self.cache, start, mask, logit_rows=slice(-1, None)
        )
        self.cache.truncate(start + count)
        return out.logits[-1]

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        start = self.cache.length
        self._verify_start = start
        tokens = verification_tokens(root, tree).unsqueeze(0)
        positions = verification_positions(start, tree).unsqueeze(0)
        mask = _prefixed(verification_mask(tree), start).unsqueeze(0) if tree.size else None
        return self.model.forward(tokens, positions, self.cache, start, mask, hidden_layers=hidden_layers)

    def commit(self, accepted_nodes: list[int]) -> None:
        self.cache.compact(self._verify_start, [0] + [node + 1 for node in accepted_nodes])

    def draft_forward(
        self, tokens: list[int], skip_layers: frozenset[int], hidden_layers: tuple[int, ...] = (), offset: int = 0
    ) -> ForwardOutput:
        start = self.cache.length + offset
        count = len(tokens)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if count == 1 else _causal_mask(start, count).unsqueeze(0)
        return self.model.forward(
            torch.tensor([tokens]), positions, self.cache, start, mask, skip_layers, hidden_layers
        )

    def close(self) -> None:
        self.cache = self.model.new_cache(1)


def _causal_mask(start: int, count: int) -> torch.Tensor:
    """``[count, start + count]``: every new row sees the cached prefix and the new rows up to itself."""
    return _prefixed(torch.ones(count, count, dtype=torch.bool).tril(), start)


def _prefixed(mask: torch.Tensor, start: int) -> torch.Tensor:
    """Prepend ``start`` always-visible cached columns to a square mask among new rows."""
    prefix = torch.ones(mask.shape[0], start, dtype=torch.bool)
    return torch.cat([prefix, mask], dim=1)
