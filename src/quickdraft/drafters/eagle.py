"""The ``eagle`` drafter: an EAGLE-style head (:mod:`quickdraft.heads.eagle`) expanded as a dynamic tree.

References: EAGLE-2 (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees")
for the tree, EAGLE-3 (Li et al. 2025) for the head.

Terms (pairs, fused and draft features: :mod:`quickdraft.heads.eagle`; draft, accepted and bonus tokens:
:mod:`quickdraft.types`):

- **committed pairs**: pairs whose feature the target computed (prefill rows, then each verification's root
  and accepted rows). Their keys and values stay in the head's own cache (:class:`PairCache`); a committed
  token whose feature is not known yet (the root) is the next token of the last committed pair.
- **score** of a draft node: the sum of the log draft probabilities of the tokens on its path (its
  cumulative draft log-probability, EAGLE-2's estimate of its acceptance).
- **expansion**: the head's forward over chosen nodes' pairs (the node's parent's draft feature and the node's
  token), giving each a distribution over its children. Depth 1 comes from the last committed pair.

Greedy requests: each depth expands the ``top_k`` best-scored nodes of the previous depth, each with its
``top_k`` most likely children; at the end the ``budget`` best-scored nodes of all are kept (EAGLE-2's rerank;
scores fall along every path, so an ancestor of a kept node is kept). The tokens are point masses.

Sampling requests: a node's children are ``top_k`` draws *without replacement* from its draft distribution
``q`` (after the request's temperature, top-k, top-p, min-p), and child ``j``'s ``draft_probs`` row is ``q``
with the tokens of children ``1 .. j-1`` removed, renormalised: the distribution it was really drawn from, so
the verifier's ratio ``p / q`` is exact. Which nodes are expanded may depend on their scores (a node's subtree
may depend on its own token), but no node is dropped for its own value: nodes are kept in the order they were
drawn and cut at the budget by count only, so every kept node is distributed as its ``draft_probs`` row says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import InvalidRequestError
from quickdraft.heads.build import load_head
from quickdraft.heads.config import shipped_head
from quickdraft.heads.eagle import EagleHead
from quickdraft.models.base import HIDDEN_STATES, TargetModel
from quickdraft.sampling import probabilities
from quickdraft.types import DraftTree, SamplingParams

NEEDS_HIDDEN = ("the {name} drafter needs the target's hidden states (the native forward, which serves the Llama "
                "family); this target runs through the transformers fallback, so choose another drafter for it")


def require_hidden_states(target: TargetModel, name: str) -> None:
    """Raise a clear error where ``target``'s sessions cannot return hidden states."""
    probe = target.new_session(1)
    try:
        if HIDDEN_STATES not in probe.capabilities:
            raise InvalidRequestError(NEEDS_HIDDEN.format(name=name))
    finally:
        probe.close()


def resolve_head(setup: DrafterSetup, kind: str, head_type: type) -> Any:
    """The head from the ``head`` option (a folder, or a bound head object) or the shipped one for the target."""
    head = setup.options.get("head")
    if isinstance(head, head_type):
        return head
    directory = Path(head) if head else shipped_head(kind, setup.target, setup.tokenizer)
    return load_head(directory, setup.target, setup.tokenizer, kind)


def sample_siblings(q: torch.Tensor, count: int, generator: torch.Generator | None) -> list[tuple[int, torch.Tensor]]:
    """Up to ``count`` sibling tokens drawn from ``q [V]`` without replacement, each with the distribution it was
    drawn from (``q`` without the earlier siblings' tokens, renormalised); fewer where ``q`` has fewer tokens.
    How many are drawn never depends on the tokens drawn, so each is distributed as its row says."""
    drawn = []
    remaining = q.float().clone()
    for _ in range(min(count, int((q > 0).sum()))):
        row = remaining / remaining.sum()
        token = int(torch.multinomial(row, 1, generator=generator))
        drawn.append((token, row))
        remaining[token] = 0.0
    return drawn


class PairCache:
    """The head's keys and values ``[1, heads, S, d]`` of the committed pairs (grown by doubling)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        self.keys = torch.zeros(1, heads, 64, head_dim)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[2]
        if end > self.keys.shape[2]:
            grown = max(end, 2 * self.keys.shape[2])
            self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], grown - self.keys.shape[2],
                                                                    self.keys.shape[3])], 2)
            self.values = torch.cat([self.values, torch.zeros_like(self.keys[:, :, self.values.shape[2]:])], 2)
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end


@dataclass
class Candidate:
    """A draft node while the tree grows: its token, parent (-1: the root), depth (1 = child of the root),
    score, its ``draft_probs`` row (sampling only) and, once expanded, its index among the expanded pairs."""

    token: int
    parent: int
    depth: int
    score: float
    probs: torch.Tensor | None = None
    expanded: int | None = None
    ancestors: list[int] = field(default_factory=list)  # indices of the expanded pairs on its path


@register("eagle")
class EagleDrafter(Drafter):
    """Options: ``head`` (a folder written by ``quickdraft train --drafter eagle``; default: the shipped head
    for the loaded model), ``top_k`` (children per expanded node and nodes expanded per depth, default 8),
    ``depth`` (tree depth at most, default 6), ``min_prob`` (a node whose path probability is below this is not
    expanded, default 0.01)."""

    needs = frozenset({"hidden_states"})
    option_names = frozenset({"head", "top_k", "depth", "min_prob"})

    def __init__(self, head: EagleHead, vocab_size: int, top_k: int = 8, depth: int = 6,
                 min_prob: float = 0.01) -> None:
        if int(top_k) < 1 or int(depth) < 1:
            raise InvalidRequestError(f"eagle: top_k and depth must be >= 1, got top_k={top_k}, depth={depth}")
        self.head = head.eval()
        self.vocab_size = vocab_size
        self.top_k, self.depth, self.min_prob = int(top_k), int(depth), float(min_prob)
        self.hidden_layers = tuple(head.config.feature_layers)
        self._reset()

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> EagleDrafter:
        require_hidden_states(setup.target, "eagle")
        options = {k: v for k, v in setup.options.items() if k != "head"}
        return cls(resolve_head(setup, "eagle", EagleHead), setup.target.vocab_size, **options)

    def _reset(self) -> None:
        self.cache = PairCache(self.head.heads, self.head.head_dim)
        self._pending: list[torch.Tensor] = []  # fused features [m, H] of committed tokens not yet paired
        self._last: torch.Tensor | None = None  # draft feature [H] of the last committed pair

    def begin(self, ctx: DraftContext) -> None:
        self._reset()

    def end(self) -> None:
        self._reset()

    @torch.inference_mode()
    def observe_prompt(self, ctx: DraftContext, hidden: dict[int, torch.Tensor]) -> None:
        self._pending.append(self._features(hidden, slice(None)))

    @torch.inference_mode()
    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """The root's and the accepted nodes' features become committed pairs' (paired in :meth:`propose`)."""
        rows = torch.tensor([0] + [node + 1 for node in outcome.result.accepted_nodes])
        self._pending.append(self._features(outcome.hidden, rows))

    def _features(self, hidden: dict[int, torch.Tensor], rows: Any) -> torch.Tensor:
        """Fused features ``[m, H]`` of ``rows`` of the target's hidden states."""
        return self.head.fused(torch.cat([hidden[layer][rows].float() for layer in self.hidden_layers], -1))

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        root = self._catch_up(ctx.tokens)
        if root is None or budget <= 0:
            return DraftTree.empty()
        return self._grow(root, budget, ctx.params, ctx.generator)

    def _catch_up(self, tokens: list[int]) -> torch.Tensor | None:
        """Pair the pending features with their next tokens and add them to the cache; the draft feature of the
        last committed pair (None before the prompt was observed)."""
        if self._pending:
            features = torch.cat(self._pending)[None]  # [1, m, H]
            self._pending = []
            start, count = self.cache.length, features.shape[1]
            if start + count + 1 != len(tokens):
                raise RuntimeError(f"eagle: {start + count} features for {len(tokens) - 1} committed tokens")
            next_tokens = torch.tensor(tokens[start + 1 :])[None]
            positions = torch.arange(start, start + count)[None]
            mask = torch.ones(count, start + count, dtype=torch.bool)
            mask[:, start:] = torch.ones(count, count, dtype=torch.bool).tril()
            out, keys, values = self.head.step(features, next_tokens, positions, self.cache.view(), mask[None])
            self.cache.append(keys, values)
            self._last = out[0, -1]
        return self._last

    def _grow(self, root: torch.Tensor, budget: int, params: SamplingParams,
              generator: torch.Generator | None) -> DraftTree:
        """The draft tree (module docstring), expanding depth by depth from the root's draft feature."""
        nodes: list[Candidate] = []
        tree_keys = torch.zeros(1, self.head.heads, 0, self.head.head_dim)
        tree_values = tree_keys
        features = root[None]  # [1, H]: draft features of the nodes whose children come next
        logits = self.head.full_logits(root, self.vocab_size)[None]  # [1, V]
        parents: list[int] = [-1]
        for depth in range(1, min(self.depth, budget) + 1):
            created = self._children(nodes, parents, logits, params, generator, depth)
            if depth == min(self.depth, budget):
                break
            chosen = self._to_expand(nodes, created)
            if not chosen:
                break
            parent_rows = [features[parents.index(nodes[c].parent)] for c in chosen]
            features, keys, values = self._expand(nodes, chosen, torch.stack(parent_rows), (tree_keys, tree_values))
            tree_keys, tree_values = torch.cat([tree_keys, keys], 2), torch.cat([tree_values, values], 2)
            logits = self.head.full_logits(features, self.vocab_size)
            parents = chosen
        return self._tree(nodes, budget, params)

    def _children(self, nodes: list[Candidate], parents: list[int], logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None, depth: int) -> list[int]:
        """Add ``top_k`` children to each of ``parents`` (rows of ``logits [len(parents), V]``); their indices."""
        created = []
        for parent, row in zip(parents, logits):
            base = nodes[parent].score if parent >= 0 else 0.0
            ancestors = (nodes[parent].ancestors + [nodes[parent].expanded]) if parent >= 0 else []
            for token, logq, probs in self._draw(row, params, generator):
                created.append(len(nodes))
                nodes.append(Candidate(token, parent, depth, base + logq, probs, None, ancestors))
        return created

    def _draw(self, logits: torch.Tensor, params: SamplingParams,
              generator: torch.Generator | None) -> list[tuple[int, float, torch.Tensor | None]]:
        """Children of one node: (token, log draft probability, draft_probs row or None)."""
        if params.greedy:
            logq = torch.log_softmax(logits, -1)
            top = torch.topk(logq, min(self.top_k, len(self.head.config.draft_vocab)))
            return [(int(t), float(v), None) for t, v in zip(top.indices, top.values)]
        q = probabilities(logits, params).float()
        return [(token, math.log(max(float(q[token]), 1e-30)), row)
                for token, row in sample_siblings(q, self.top_k, generator)]

    def _to_expand(self, nodes: list[Candidate], created: list[int]) -> list[int]:
        """The ``top_k`` best-scored of the newest nodes whose path probability reaches ``min_prob``."""
        ranked = sorted(created, key=lambda n: -nodes[n].score)[: self.top_k]
        return [n for n in ranked if math.exp(nodes[n].score) >= self.min_prob]

    def _expand(self, nodes: list[Candidate], chosen: list[int], parent_features: torch.Tensor,
                tree_kv: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The head's forward over the chosen nodes' pairs (``parent_features [T, H]``, after the committed pairs
        and the pairs expanded before, ``tree_kv``): their draft features ``[T, H]`` and keys/values."""
        count, cached, expanded_before = len(chosen), self.cache.length, tree_kv[0].shape[2]
        mask = torch.zeros(count, cached + expanded_before + count, dtype=torch.bool)
        mask[:, :cached] = True
        for row, node in enumerate(chosen):
            nodes[node].expanded = expanded_before + row
            mask[row, [cached + a for a in nodes[node].ancestors]] = True
            mask[row, cached + expanded_before + row] = True
        tokens = torch.tensor([nodes[n].token for n in chosen])[None]
        positions = torch.tensor([cached - 1 + nodes[n].depth for n in chosen])[None]
        keys, values = self.cache.view()
        keys, values = torch.cat([keys, tree_kv[0]], 2), torch.cat([values, tree_kv[1]], 2)
        out, new_keys, new_values = self.head.step(parent_features[None], tokens, positions, (keys, values), mask[None])
        return out[0], new_keys, new_values

    def _tree(self, nodes: list[Candidate], budget: int, params: SamplingParams) -> DraftTree:
        """Greedy: the ``budget`` best-scored nodes, parents first and siblings best first; sampling: the first
        ``budget`` nodes in the order they were drawn."""
        if params.greedy:
            keep = sorted(sorted(range(len(nodes)), key=lambda n: (-nodes[n].score, nodes[n].depth, n))[:budget],
                          key=lambda n: (nodes[n].depth, -nodes[n].score, n))
        else:
            keep = list(range(min(budget, len(nodes))))
        index = {node: i for i, node in enumerate(keep)}
        tokens = torch.tensor([nodes[n].token for n in keep], dtype=torch.long)
        parents = torch.tensor([-1 if nodes[n].parent < 0 else index[nodes[n].parent] for n in keep], dtype=torch.long)
        probs = None if params.greedy or not keep else torch.stack([nodes[n].probs for n in keep])
        return DraftTree(tokens, parents, probs)
