"""The generic fallback: any transformers causal LM, verified chain by chain through its own forward.

Slower than the native forward (transformers' dynamic cache, one chain per step, no layer skipping) but
correct for every architecture transformers supports. Rejected draft tokens are dropped by cropping the
cache, which keeps every layer's full history (transformers' sliding-window cache layers cannot be cropped
once the window is full; the model's own attention mask still applies the window). A prefill asks for the
last position's logits only where the model takes ``logits_to_keep``: a full-vocabulary output layer over
every prompt token would dominate the prefill of a large-vocabulary model (Gemma 3: 262k tokens).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from quickdraft.models.base import ForwardOutput, TargetModel, TargetSession
from quickdraft.types import DraftTree


class HFCausalLM(TargetModel):
    """Wraps any loaded transformers causal LM."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        config = hf_model.config.get_text_config()
        self.hf_model = hf_model
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_context = getattr(config, "max_position_embeddings", 2048)
        self.num_layers = config.num_hidden_layers
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    def new_session(self, max_len: int) -> HFSession:
        return HFSession(self)


class HFSession(TargetSession):
    """One sequence in an :class:`HFCausalLM` (chains only: no ``TREE`` capability)."""

    capabilities = frozenset()

    def __init__(self, model: HFCausalLM) -> None:
        self.model = model
        self.cache = DynamicCache()
        self.length = 0
        self._verify_start = 0

    @property
    def cached_length(self) -> int:
        return self.length

    @torch.inference_mode()
    def _forward(self, token_ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Logits ``[T, V]`` for the T new tokens, or ``[1, V]`` for the last one where ``last_only`` can be
        honoured (the model takes ``logits_to_keep``)."""
        ids = torch.tensor([token_ids], device=self.model.device)
        positions = torch.arange(self.length, self.length + len(token_ids), device=self.model.device)
        last = {"logits_to_keep": 1} if last_only and self.model.accepts_logits_to_keep else {}
        out = self.model.hf_model(
            input_ids=ids,
            past_key_values=self.cache,
            position_ids=positions.unsqueeze(0),
            cache_position=positions,
            use_cache=True,
            **last,
        )
        self.length += len(token_ids)
        return out.logits[0].float()

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.cache = DynamicCache()
        self.length = 0
        return self.extend(prompt_ids)

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        return self._forward(token_ids, last_only=True)[-1]

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # a negative count removes that many trailing tokens
        self.length = length

    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        if not tree.is_chain():
            raise ValueError("the transformers fallback verifies chains only; pass tree.first_chain()")
        self._verify_start = self.length
        return ForwardOutput(self._forward([root, *tree.tokens.tolist()]))

    def commit(self, accepted_nodes: list[int]) -> None:
        self.truncate(self._verify_start + 1 + len(accepted_nodes))

    def close(self) -> None:
        self.cache = DynamicCache()
        self.length = 0
