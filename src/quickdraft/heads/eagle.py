"""An EAGLE-style draft head: one small decoder layer on the target's own features.

References: EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"),
EAGLE-2 (Li et al. 2024, dynamic draft trees) and EAGLE-3 (Li et al. 2025, "Scaling up Inference Acceleration
of Large Language Models via Training-Time Test": fused multi-layer features, training-time test).

Terms (token ``t_i`` at position ``i``; the target's hidden states of ``t_i`` at its feature layers
``f_i``, concatenated ``[F * H]``):

- **pair** ``i``: the head's input at position ``i``: the fused feature of ``t_i`` and the target's (frozen)
  embedding of the next token ``t_{i+1}``. The head's output at pair ``i`` scores ``t_{i+2}``.
- **fused feature**: ``fuse(f_i)``, a linear map of the low, middle and top layers' states to ``[H]``
  (EAGLE-3). Where the target has not computed ``f_i`` yet (a drafted token), the head's own output at pair
  ``i - 1`` (its **draft feature**, before the final norm) stands in for it.
- **step** ``s`` of training-time test: the head's forward when its features are ``s - 1`` draft features
  deep; pair ``i`` at step ``s`` attends to step-1 pairs ``<= i - s + 1`` (true features) and to the pair at
  ``i - (s - r)`` of each later step ``r`` (its own drafted ancestors), exactly as when drafting.

The output layer scores only the draft vocabulary with the target's own output-layer rows (frozen, not saved);
what the head saves is the fuse and combine linears, its decoder layer and its norms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.heads.config import HeadConfig, draft_vocab_tensor, embedding_table, output_rows
from quickdraft.models.base import TargetModel

ROPE_BASE = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x [B, heads, T, d]`` at ``positions [B, T]``."""
    half = x.shape[-1] // 2
    freqs = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.float().unsqueeze(-1) * freqs  # [B, T, d/2]
    cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer (attention with its own keys and values, then a SwiGLU MLP)."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.attn_norm, self.mlp_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, H]`` at ``positions [B, T]``, attending to ``past`` keys/values ``[B, heads, S, d]``
        (may be None) followed by its own rows, where ``mask [B or 1, T, S + T]`` is True. Returns the output
        ``[B, T, H]`` and the rows' own keys and values ``[B, heads, T, d]``."""
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rotate(q, positions), rotate(k, positions)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1))
        x = x + self.o(out.transpose(1, 2).reshape(batch, length, hidden))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up), k, v


class EagleHead(nn.Module):
    """The head of :mod:`this module <quickdraft.heads.eagle>`; :meth:`bind` attaches the target's frozen
    embedding and output rows before use."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        heads = config.num_heads if config.num_heads and hidden % config.num_heads == 0 else max(1, hidden // 64)
        self.fuse = nn.Linear(len(config.feature_layers) * hidden, hidden, bias=False)
        self.embed_norm, self.feature_norm = RMSNorm(hidden), RMSNorm(hidden)
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = DecoderLayer(hidden, heads, config.intermediate_size or 2 * hidden)
        self.norm = RMSNorm(hidden)
        self.register_buffer("draft_ids", draft_vocab_tensor(config), persistent=False)
        self.register_buffer("out_weight", torch.zeros(len(config.draft_vocab), hidden), persistent=False)
        object.__setattr__(self, "_embed", None)

    @property
    def heads(self) -> int:
        return self.layer.heads

    @property
    def head_dim(self) -> int:
        return self.layer.head_dim

    def bind(self, target: TargetModel) -> EagleHead:
        """Attach the target's embedding lookup and its output rows for the draft vocabulary."""
        return self.bind_tables(embedding_table(target), output_rows(target, self.draft_ids))

    def bind_tables(self, embed: nn.Module, out_weight: torch.Tensor) -> EagleHead:
        object.__setattr__(self, "_embed", embed)  # the target's: not a submodule, never trained or saved
        self.out_weight = out_weight.float().to(self.draft_ids.device)
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The target's embeddings ``[..., H]`` of ``tokens`` (frozen)."""
        device = next(iter(self._embed.parameters())).device if isinstance(self._embed, nn.Module) else tokens.device
        with torch.no_grad():
            return self._embed(tokens.to(device)).float().detach().to(tokens.device)

    def fused(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., F * H]`` target features -> ``[..., H]`` fused features."""
        return self.fuse(features.float())

    def step(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             past: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoder pass over pairs (``features [B, T, H]`` fused or draft, next ``tokens [B, T]``):
        the draft features ``[B, T, H]`` and the pairs' keys/values (see :meth:`DecoderLayer.forward`)."""
        x = self.combine(torch.cat([self.embed_norm(self.embed(tokens)), self.feature_norm(features)], -1))
        return self.layer(x, positions, past, mask)

    def logits(self, draft_features: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` -> scores ``[..., Vd]`` over the draft vocabulary."""
        return self.norm(draft_features) @ self.out_weight.T

    def full_logits(self, draft_features: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Scores ``[..., V]`` over the target's vocabulary, ``-inf`` outside the draft vocabulary."""
        scores = self.logits(draft_features)
        full = torch.full((*scores.shape[:-1], vocab_size), -math.inf, dtype=scores.dtype)
        full[..., self.draft_ids] = scores
        return full

    def train_forward(self, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test: scores ``[B, T, Vd]`` of each step ``1 .. steps`` (module docstring) for pairs
        of target ``features [B, T, F * H]`` and next ``tokens [B, T]``. Every step's row ``i`` scores
        ``t_{i+2}``; rows ``i < s - 1`` of step ``s`` have no drafted ancestor chain and are to be ignored."""
        batch, length, _ = features.shape
        positions = torch.arange(length, device=features.device).expand(batch, length)
        index = torch.arange(length, device=features.device)
        current = self.fused(features)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        out = []
        for s in range(1, steps + 1):
            # Visible: step-1 rows j <= i - s + 1, and row i - (s - r) of each step r = 2 .. s.
            visible = [index[None, :] <= index[:, None] - s + 1]
            visible += [index[None, :] == index[:, None] - (s - r) for r in range(2, s + 1)]
            past = (torch.cat(keys, 2), torch.cat(values, 2)) if keys else None
            hidden, k, v = self.step(current, tokens, positions, past, torch.cat(visible, 1).unsqueeze(0))
            keys.append(k)
            values.append(v)
            out.append(self.logits(hidden))
            current = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)  # draft feature of i - 1
        return out
