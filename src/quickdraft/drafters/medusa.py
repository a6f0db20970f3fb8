"""The ``medusa`` drafter: Medusa heads (:mod:`quickdraft.heads.medusa`) verified as a tree of their top tokens.

Reference: Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads"
(the sparse tree built from measured per-head accuracy).

Terms:

- **rank path** ``(r_1, .., r_d)``: the tree node reached by taking head 1's rank-``r_1`` token, then head 2's
  rank-``r_2`` token, and so on (rank 0 = most likely).
- **expected acceptance** of a rank path: ``prod_i accuracy[i][r_i]``, with ``accuracy[k][r]`` how often head
  ``k``'s rank-``r`` token was the target's on held-out data (stored in the head's config by training).
- **tree shape**: the ``budget`` rank paths of highest expected acceptance (:func:`tree_shape`); it is fixed
  before any token is chosen.

Greedy requests fill the shape with each head's ranked tokens (point masses). Sampling requests draw the
children of each node from the head's draft distribution ``q`` without replacement, as many as the shape
gives that node, and record each child's distribution (:func:`~quickdraft.drafters.eagle.sample_siblings`), so
the lossless verifier's ratios are exact.
"""

from __future__ import annotations

import heapq

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.drafters.eagle import require_hidden_states, resolve_head, sample_siblings
from quickdraft.errors import InvalidRequestError
from quickdraft.heads.medusa import MedusaHead
from quickdraft.sampling import probabilities
from quickdraft.types import DraftTree, SamplingParams


def default_accuracy(heads: int, top_k: int) -> list[list[float]]:
    """A guess for an untrained head: accuracy halves per head and falls with rank."""
    return [[0.5 ** (k + 1) / (r + 1) for r in range(top_k)] for k in range(heads)]


def tree_shape(accuracy: list[list[float]], budget: int) -> list[tuple[int, ...]]:
    """The ``budget`` rank paths of highest expected acceptance (module docstring), parents before children.
    Each row of ``accuracy`` is taken in descending order, so a kept path's parent and elder sibling are kept."""
    rows = [sorted(row, reverse=True) for row in accuracy]
    if not rows or not rows[0]:
        return []
    chosen: list[tuple[int, ...]] = []
    heap = [(-rows[0][0], (0,))]
    while heap and len(chosen) < budget:
        value, path = heapq.heappop(heap)
        chosen.append(path)
        depth, rank = len(path), path[-1]
        if rank + 1 < len(rows[depth - 1]):  # next sibling
            parent_value = -value / rows[depth - 1][rank]
            heapq.heappush(heap, (-parent_value * rows[depth - 1][rank + 1], path[:-1] + (rank + 1,)))
        if depth < len(rows):  # first child
            heapq.heappush(heap, (value * rows[depth][0], path + (0,)))
    return sorted(chosen, key=lambda p: (len(p), p))


@register("medusa")
class MedusaDrafter(Drafter):
    """Options: ``head`` (a folder written by ``quickdraft train --drafter medusa``; default: the shipped head
    for the loaded model), ``top_k`` (ranks per head considered for the tree, default 8)."""

    needs = frozenset({"hidden_states"})
    option_names = frozenset({"head", "top_k"})
    hidden_layers = (-1,)

    def __init__(self, head: MedusaHead, vocab_size: int, top_k: int = 8) -> None:
        if int(top_k) < 1:
            raise InvalidRequestError(f"medusa: top_k must be >= 1, got {top_k}")
        self.head = head.eval()
        self.vocab_size = vocab_size
        accuracy = head.config.accuracy or default_accuracy(head.num_heads, int(top_k))
        self.accuracy = [row[: int(top_k)] for row in accuracy]
        self._feature: torch.Tensor | None = None

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> MedusaDrafter:
        require_hidden_states(setup.target, "medusa")
        options = {k: v for k, v in setup.options.items() if k != "head"}
        return cls(resolve_head(setup, "medusa", MedusaHead), setup.target.vocab_size, **options)

    def begin(self, ctx: DraftContext) -> None:
        self._feature = None

    def end(self) -> None:
        self._feature = None

    def observe_prompt(self, ctx: DraftContext, hidden: dict[int, torch.Tensor]) -> None:
        self._feature = hidden[-1][-1].float()

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """The feature of the last accepted node (the root when none was): the bonus token's predecessor."""
        accepted = outcome.result.accepted_nodes
        self._feature = outcome.hidden[-1][accepted[-1] + 1 if accepted else 0].float()

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        if self._feature is None or budget <= 0:
            return DraftTree.empty()
        logits = self.head.full_logits(self._feature, self.vocab_size)  # [K, V]
        shape = tree_shape(self.accuracy, budget)
        if ctx.params.greedy:
            return self._ranked_tree(shape, logits)
        return self._sampled_tree(shape, logits, ctx.params, ctx.generator)

    def _ranked_tree(self, shape: list[tuple[int, ...]], logits: torch.Tensor) -> DraftTree:
        top = torch.topk(logits, min(len(self.accuracy[0]), len(self.head.config.draft_vocab)), dim=-1).indices
        index = {path: i for i, path in enumerate(shape)}
        tokens = [int(top[len(path) - 1, path[-1]]) for path in shape]
        parents = [index[path[:-1]] if len(path) > 1 else -1 for path in shape]
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def _sampled_tree(self, shape: list[tuple[int, ...]], logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None) -> DraftTree:
        """Each node's children drawn without replacement from its depth's head (module docstring)."""
        q = probabilities(logits, params)  # [K, V]
        index = {path: i for i, path in enumerate(shape)}
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for path in shape:
            groups.setdefault(path[:-1], []).append(path)
        tokens: list[int] = [0] * len(shape)
        rows: list[torch.Tensor | None] = [None] * len(shape)
        for parent, members in groups.items():
            drawn = sample_siblings(q[len(parent)], len(members), generator)
            for path, (token, row) in zip(members, drawn):
                tokens[index[path]], rows[index[path]] = token, row
        keep = [i for i, row in enumerate(rows) if row is not None and all(
            rows[index[shape[i][:d]]] is not None for d in range(1, len(shape[i])))]
        renumber = {old: new for new, old in enumerate(keep)}
        parents = [renumber[index[shape[i][:-1]]] if len(shape[i]) > 1 else -1 for i in keep]
        return DraftTree(torch.tensor([tokens[i] for i in keep], dtype=torch.long),
                         torch.tensor(parents, dtype=torch.long),
                         torch.stack([rows[i] for i in keep]) if keep else None)
