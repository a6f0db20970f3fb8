"""The data that flows through one speculative decoding step.

Terms, defined once and used everywhere in quickdraft:

- **draft token**: a token a drafter proposes; the nodes of a :class:`DraftTree`.
- **accepted token**: a draft token that verification keeps (it lies on the accepted path).
- **bonus token**: the one token the target adds after the accepted path in every verification step
  (sampled from the target at the last accepted node, or from the residual distribution after a rejection).
- **committed tokens** of a step = accepted tokens + the bonus token.
- **target forward**: one forward pass of the target model (prefill counts as one).
- **mean accepted tokens (tau)** = committed tokens / target forwards. Plain decoding commits one token per
  forward, so its tau is exactly 1.00; a step that accepts 3 draft tokens commits 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from quickdraft.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax) decoding.

    The filters apply in this order: temperature, top-k, top-p (nucleus), min-p. ``top_k = 0`` and
    ``top_p = 1`` and ``min_p = 0`` disable their filter. ``seed`` makes sampling reproducible.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _require_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _require_finite("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        _require_finite("min_p", self.min_p)
        if not 0 <= self.min_p < 1:
            raise InvalidRequestError(f"min_p must be in [0, 1) (0 disables it), got {self.min_p}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _require_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens arranged as a tree rooted at the last committed token.

    Node ``i`` holds ``tokens[i]``; its parent is node ``parents[i]`` (``-1``: the root, i.e. the last
    committed token). Parents come before children (``parents[i] < i``), and siblings are ordered best
    first. A chain has ``parents[i] = i - 1``.

    ``draft_probs[i]`` is the distribution the drafter drew ``tokens[i]`` from (given the path to its
    parent), a ``[N, V]`` tensor; ``None`` means the drafter is deterministic and each draft token is
    treated as a point mass during rejection sampling.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise ValueError("DraftTree.tokens and .parents must be 1-D tensors of the same length")
        if self.draft_probs is not None and self.draft_probs.shape[0] != self.tokens.shape[0]:
            raise ValueError("DraftTree.draft_probs must have one row per node")

    @classmethod
    def empty(cls) -> DraftTree:
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @classmethod
    def chain(cls, tokens: list[int] | torch.Tensor, draft_probs: torch.Tensor | None = None) -> DraftTree:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        parents = torch.arange(tokens.numel(), dtype=torch.long) - 1
        return cls(tokens, parents, draft_probs)

    @classmethod
    def from_paths(cls, paths: list[list[int]]) -> DraftTree:
        """Merge token sequences into a prefix tree (shared prefixes become shared nodes), keeping the
        order in which paths are given as the sibling order."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            parent = -1
            for token in path:
                key = (parent, int(token))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(parent)
                parent = index[key]
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    def is_chain(self) -> bool:
        return bool(torch.equal(self.parents, torch.arange(self.size) - 1))

    def truncated(self, budget: int) -> DraftTree:
        """The first ``budget`` nodes (still a tree, since parents precede children)."""
        if budget >= self.size:
            return self
        probs = None if self.draft_probs is None else self.draft_probs[:budget]
        return DraftTree(self.tokens[:budget], self.parents[:budget], probs)

    def first_chain(self) -> DraftTree:
        """The path that follows the first (best) child from the root: the chain a target that cannot
        verify trees checks instead."""
        nodes: list[int] = []
        parent = -1
        parents = self.parents.tolist()
        for i, p in enumerate(parents):
            if p == parent:
                nodes.append(i)
                parent = i
        index = torch.tensor(nodes, dtype=torch.long)
        probs = None if self.draft_probs is None else self.draft_probs[index]
        return DraftTree.chain(self.tokens[index], probs)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of verifying one draft tree.

    ``accepted_nodes`` are the tree nodes on the accepted path, root first; ``tokens`` are the committed
    tokens of the step: the accepted draft tokens followed by the bonus token.
    """

    accepted_nodes: list[int]
    tokens: list[int]
    num_drafted: int

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)

    @property
    def bonus_token(self) -> int:
        return self.tokens[-1]


@dataclass
class GenerationStats:
    """Counts for one generation; ``tau`` is committed tokens per target forward (see module docstring).

    ``new_tokens`` counts committed tokens up to and including an EOS token (which the returned text and
    ids leave out) and never past ``max_new_tokens``."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # time spent inside the drafter (propose and observe)
    total_seconds: float = 0.0
    drafter: str = "none"

    @property
    def tau(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0


@dataclass
class GenerationResult:
    """What :meth:`quickdraft.Engine.generate` returns."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    stats: GenerationStats = field(default_factory=GenerationStats)
