"""Medusa heads: K small residual blocks on the target's last hidden state, each guessing one token further.

Reference: Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads".

Terms: the **feature** is the target's final normed hidden state (layer ``-1``) ``h`` of the token before the
root (the one whose logits gave the root). Head ``k`` (``k = 1 .. K``) scores the token ``k`` places after the
root: ``logits_k = W_out (h + SiLU(A_k h))`` over the draft vocabulary, ``W_out`` the target's own output rows
(frozen, not saved). Head ``k``'s guess does not depend on the guesses of heads ``< k``, so a Medusa tree
combines each head's top tokens (the tree shape: :func:`quickdraft.drafters.medusa.tree_shape`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quickdraft.heads.config import HeadConfig, draft_vocab_tensor, output_rows
from quickdraft.models.base import TargetModel


class MedusaHead(nn.Module):
    """K residual heads; :meth:`bind` attaches the target's output rows for the draft vocabulary."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(config.num_heads))
        for block in self.blocks:  # start as the identity: every head first guesses the target's next token
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.register_buffer("draft_ids", draft_vocab_tensor(config), persistent=False)
        self.register_buffer("out_weight", torch.zeros(len(config.draft_vocab), hidden), persistent=False)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    def bind(self, target: TargetModel) -> MedusaHead:
        return self.bind_tables(None, output_rows(target, self.draft_ids))

    def bind_tables(self, embed: nn.Module | None, out_weight: torch.Tensor) -> MedusaHead:
        self.out_weight = out_weight.float().to(self.draft_ids.device)
        return self

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature [..., H]`` -> scores ``[..., K, Vd]`` of every head over the draft vocabulary."""
        feature = feature.float()
        states = torch.stack([feature + F.silu(block(feature)) for block in self.blocks], -2)
        return states @ self.out_weight.T

    def full_logits(self, feature: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Scores ``[K, V]`` over the target's vocabulary, ``-inf`` outside the draft vocabulary."""
        scores = self(feature)
        full = torch.full((*scores.shape[:-1], vocab_size), -math.inf, dtype=scores.dtype)
        full[..., self.draft_ids] = scores
        return full
