"""What the engine needs from a target model: one :class:`TargetSession` per sequence being generated.

A session owns the sequence's KV cache. Its cache holds every committed token except the last one, the
*root*: the root is fed as row 0 of the next verification forward, followed by the draft tree's nodes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from quickdraft.types import DraftTree

#: Capabilities a target session may declare; drafters and the engine dispatch on these, never on names.
TREE = "tree"  # verifies a branching tree in one forward (otherwise: chains only)
HIDDEN_STATES = "hidden_states"  # returns hidden states of chosen layers
LAYER_SKIP = "layer_skip"  # runs a forward with chosen layers skipped (self-speculation)


@dataclass
class ForwardOutput:
    """Logits ``[rows, V]`` of a forward, and hidden states ``{layer: [rows, hidden]}`` if asked for.
    Layer ``i`` means the output of decoder layer ``i``; ``-1`` the final normed hidden state."""

    logits: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class TargetSession(ABC):
    """One sequence's state inside a target model."""

    capabilities: frozenset[str] = frozenset()

    @property
    @abstractmethod
    def cached_length(self) -> int:
        """Number of tokens whose keys and values are in the cache (all committed tokens but the root)."""

    @abstractmethod
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Reset the cache, put the whole prompt in it and return the logits ``[V]`` after its last token.
        The first generated token, sampled from them, is the root of the first verification."""

    def prefill_hidden(self, prompt_ids: list[int], hidden_layers: tuple[int, ...]) -> ForwardOutput:
        """:meth:`prefill`, also returning the hidden states ``{layer: [P, hidden]}`` of the prompt's tokens
        (layer ``-1``, the final normed state, for the last token only); logits ``[1, V]`` after the last.
        Only sessions that declare ``HIDDEN_STATES`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot return hidden states")

    @abstractmethod
    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Forward the root and the tree's nodes in one pass (tree attention); rows as in ``verify.py``."""

    @abstractmethod
    def commit(self, accepted_nodes: list[int]) -> None:
        """Keep the root and the accepted nodes in the cache after :meth:`verify`; drop the rest."""

    @abstractmethod
    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` to the cache (all committed); return the logits ``[V]`` after the last."""

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget cached tokens from position ``length`` on."""

    def draft_forward(
        self,
        tokens: list[int],
        skip_layers: frozenset[int],
        hidden_layers: tuple[int, ...] = (),
        offset: int = 0,
    ) -> ForwardOutput:
        """Forward a chain placed ``offset`` tokens after the cached sequence, with ``skip_layers`` skipped,
        writing its cache entries beyond the committed length (the next verification overwrites them).
        Only sessions that declare ``LAYER_SKIP`` implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot skip layers")

    def close(self) -> None:
        """Free the session's cache."""


class TargetModel(ABC):
    """A loaded causal LM that can open sessions."""

    vocab_size: int
    max_context: int
    num_layers: int
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def new_session(self, max_len: int) -> TargetSession:
        """A session able to hold ``max_len`` tokens (prompt + generated + draft slack)."""
