"""The ``lookahead`` drafter: Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding", arXiv:2402.02057). Training-free and deterministic.

Terms:

- **n-gram pool**: a map from a token to up to ``pool_size`` continuations of ``ngram - 1`` tokens that
  followed it, most recent first. It is filled from the prompt, from every committed token, and from the
  Jacobi lane. Each step, the pool's continuations of the root (the last committed token) are the
  **verification branch**: up to ``max_candidates`` of them, merged into a draft tree.
- **Jacobi lane**: ``window`` guessed tokens for the positions right after the root. Jacobi iteration refines a
  guess from the target's own prediction: the new guess for lane position ``j`` is the target's argmax after
  lane position ``j - 1`` (after the root for ``j = 0``). After ``m`` tokens are committed the lane shifts by
  ``m``, and its tail is refilled from the pool, else with random tokens from the sequence.

Simplification (honest): the paper runs a 2-D lookahead branch, ``window`` positions by ``ngram - 1`` past
Jacobi iterations, with its own attention mask in the same forward as verification, and harvests the
diagonal n-grams of that window. Our verification forward only verifies draft trees, so the lookahead branch
here is a single lane, appended to the draft tree as one more chain from the root: it is verified like any
other branch (an accepted lane prefix is committed), and the target's logits at its nodes, returned because
``needs`` includes ``"target_logits"``, give the next Jacobi iterate. The n-grams harvested from the lane are
the windows of that iterate (the target's argmax at the root and at each lane node), not the 2-D diagonals.
Losslessness does not depend on any of this: the verifier keeps only what the target would have produced.
"""

from __future__ import annotations

import random

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, StepOutcome
from quickdraft.errors import InvalidRequestError
from quickdraft.tree import children
from quickdraft.types import DraftTree


@register("lookahead")
class LookaheadDrafter(Drafter):
    """Propose pool n-grams that continue the root, plus the Jacobi lane as one more chain.

    Options:

    - ``ngram`` (4): n-gram length ``N`` (continuations of ``N - 1`` tokens); at least 2.
    - ``window`` (6): Jacobi lane length ``W``.
    - ``max_candidates`` (4): pool n-grams proposed per step (the paper's ``G``).
    - ``pool_size`` (8): continuations kept per token; the pool is freed at :meth:`end`.
    - ``seed`` (0): seed of the random tokens that fill the lane before the target has refined it.
    """

    needs = frozenset({"target_logits"})

    def __init__(
        self, ngram: int = 4, window: int = 6, max_candidates: int = 4, pool_size: int = 8, seed: int = 0
    ) -> None:
        self.ngram = _at_least("ngram", ngram, 2)
        self.window = _at_least("window", window, 1)
        self.max_candidates = _at_least("max_candidates", max_candidates, 0)
        self.pool_size = _at_least("pool_size", pool_size, 1)
        self.seed = int(seed)
        self._reset()

    def _reset(self) -> None:
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.lane: list[int] = []
        self._lane_at = 0  # length of the sequence whose next positions the lane guesses
        self._consumed = 0
        self._proposed_lane: list[int] = []
        self._rng = random.Random(self.seed)

    # -- the pool --
    def add_ngram(self, ngram: list[int] | tuple[int, ...]) -> None:
        """Put ``ngram[1:]`` first among the continuations of ``ngram[0]``."""
        key, cont = int(ngram[0]), tuple(int(t) for t in ngram[1:])
        entries = self.pool.setdefault(key, [])
        if cont in entries:
            entries.remove(cont)
        entries.insert(0, cont)
        del entries[self.pool_size :]

    def harvest(self, tokens: list[int], start: int = 0) -> None:
        """Add every n-gram of ``tokens`` that ends at index ``start`` or later."""
        first = max(0, start - self.ngram + 1)
        for i in range(first, len(tokens) - self.ngram + 1):
            self.add_ngram(tokens[i : i + self.ngram])

    def _sync_text(self, ctx: DraftContext) -> None:
        if len(ctx.tokens) < self._consumed:
            self._reset()
        self.harvest(ctx.tokens, self._consumed)
        self._consumed = len(ctx.tokens)

    # -- the lane --
    def _fill_lane(self, lane: list[int], tokens: list[int]) -> list[int]:
        """Pad ``lane`` to ``window`` tokens: the pool's continuation of its last token, else random tokens
        of the sequence."""
        lane = lane[: self.window]
        while len(lane) < self.window:
            last = lane[-1] if lane else (tokens[-1] if tokens else None)
            guesses = self.pool.get(last, []) if last is not None else []
            if guesses:
                lane.extend(guesses[0][: self.window - len(lane)])
            elif tokens:
                lane.append(self._rng.choice(tokens))
            else:
                break
        return lane

    def _align_lane(self, tokens: list[int]) -> None:
        """Shift the lane past tokens committed without an :meth:`observe` (e.g. the engine's first token,
        chosen from the prefill logits), and refill it."""
        behind = len(tokens) - self._lane_at
        self.lane = self._fill_lane(self.lane[behind:] if behind >= 0 else [], tokens)
        self._lane_at = len(tokens)

    def _jacobi_iterate(self, outcome: StepOutcome, logits: torch.Tensor) -> list[int]:
        """The target's argmax at the root, then at each lane node that was verified: the new guesses for
        the positions 1, 2, ... after the old root."""
        nodes = _path_nodes(outcome.tree, self._proposed_lane)
        rows = torch.tensor([0] + [n + 1 for n in nodes], dtype=torch.long, device=logits.device)
        return logits.index_select(0, rows).argmax(dim=-1).tolist()

    # -- the drafter protocol --
    def begin(self, ctx: DraftContext) -> None:
        self._reset()
        self._sync_text(ctx)
        self._align_lane(ctx.tokens)

    def end(self) -> None:
        self._reset()

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        self._sync_text(ctx)
        guesses = self.lane
        logits = outcome.logits
        if logits is not None and logits.shape[0] == outcome.tree.size + 1:
            iterate = self._jacobi_iterate(outcome, logits)
            self.harvest(iterate)
            guesses = iterate + self.lane[len(iterate) :]  # lane[j] guesses position j + 1
        shift = len(ctx.tokens) - self._lane_at  # the tokens committed since the lane's root
        self.lane = self._fill_lane(guesses[shift:], ctx.tokens)
        self._lane_at = len(ctx.tokens)
        self._proposed_lane = []

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        self._sync_text(ctx)
        self._proposed_lane = []
        self._align_lane(ctx.tokens)  # the lane (and a Jacobi iterate in observe) is relative to this root
        if budget <= 0 or not ctx.tokens:
            return DraftTree.empty()
        candidates = [list(c) for c in self.pool.get(int(ctx.tokens[-1]), [])[: self.max_candidates]]
        lane_budget = min(len(self.lane), budget // 4 if candidates else budget)
        builder = _TreeBuilder()
        for path in candidates:
            builder.add(path, budget - lane_budget)
        self._proposed_lane = self.lane[: len(builder.add(self.lane[:lane_budget], budget))]
        return builder.tree()


class _TreeBuilder:
    """Merges paths into a prefix tree (like :meth:`DraftTree.from_paths`) under a node limit."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.index: dict[tuple[int, int], int] = {}

    def add(self, path: list[int], limit: int) -> list[int]:
        """Add ``path`` while the tree has fewer than ``limit`` nodes; the nodes along the added prefix."""
        nodes: list[int] = []
        parent = -1
        for token in path:
            key = (parent, int(token))
            if key not in self.index:
                if len(self.tokens) >= limit:
                    break
                self.index[key] = len(self.tokens)
                self.tokens.append(int(token))
                self.parents.append(parent)
            parent = self.index[key]
            nodes.append(parent)
        return nodes

    def tree(self) -> DraftTree:
        return DraftTree(torch.tensor(self.tokens, dtype=torch.long), torch.tensor(self.parents, dtype=torch.long))


def _path_nodes(tree: DraftTree, path: list[int]) -> list[int]:
    """The nodes of ``tree`` spelling the longest prefix of ``path`` from the root."""
    kids = children(tree)
    tokens = tree.tokens.tolist()
    nodes: list[int] = []
    row = 0
    for token in path:
        node = next((c for c in kids[row] if tokens[c] == token), None)
        if node is None:
            break
        nodes.append(node)
        row = node + 1
    return nodes


def _at_least(name: str, value: int | str, low: int) -> int:
    number = int(value)
    if number < low:
        raise InvalidRequestError(f"lookahead drafter option {name} must be an integer >= {low}, got {value!r}")
    return number
