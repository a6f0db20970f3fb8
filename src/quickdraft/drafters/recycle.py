"""The ``recycle`` drafter: Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating
Inference of Large Language Models with Token Recycling", arXiv:2408.08696). Training-free, deterministic.

Terms:

- **adjacency matrix** ``M`` of shape ``[V, k]``: row ``t`` holds the ``k`` tokens the target ranked highest
  the last time it predicted the token after ``t`` (``-1``: unknown). Every verification forward produces
  logits for the root and every draft node, including rejected ones; those otherwise wasted candidates are
  "recycled" into ``M``: ``M[token of row r] = topk(logits[r])``.
- **template**: a fixed draft-tree shape, a list of ``(parent, rank)`` pairs; node ``i`` holds
  ``M[token of its parent][rank]`` (parent ``-1``: the root, the last committed token). :func:`default_template`
  is wide near the root and narrow deep down, and ordered so that its first ``B`` nodes are the best ``B``-node
  tree under a simple model of how often each rank is right.

Before the target has predicted after a token, its row is seeded from the prompt's bigrams (the token that
followed it), filling only unknown slots. ``M`` is cross-request state kept in memory: ``V * k`` int32
(about 4.9 MB for ``V = 152k``, ``k = 8``), created lazily with the vocabulary size from the setup or from the
first logits; :meth:`RecycleDrafter.save` / :meth:`RecycleDrafter.load` store it as a safetensors file.
"""

from __future__ import annotations

import heapq
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import InvalidRequestError
from quickdraft.types import DraftTree

#: How often the candidate of each rank is assumed right; shapes :func:`default_template`.
RANK_PROBS = (0.5, 0.18, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)

Template = list[tuple[int, int]]
_SKIPPED = -2


def default_template(size: int = 64, k: int = 8, max_depth: int = 6) -> Template:
    """The ``size`` nodes with the highest path probability (the product of :data:`RANK_PROBS` along the
    path), at most ``max_depth`` deep, best first; parents always precede children."""
    probs = RANK_PROBS[:k]
    template: Template = []
    frontier: list[tuple[float, int, int, int]] = []  # (-score, depth, parent, rank)

    def expand(parent: int, score: float, depth: int) -> None:
        if depth < max_depth:
            for rank, p in enumerate(probs):
                heapq.heappush(frontier, (-score * p, depth + 1, parent, rank))

    expand(-1, 1.0, 0)
    while frontier and len(template) < size:
        neg_score, depth, parent, rank = heapq.heappop(frontier)
        template.append((parent, rank))
        expand(len(template) - 1, -neg_score, depth)
    return template


@register("recycle")
class RecycleDrafter(Drafter):
    """Expand the adjacency matrix from the root along a static tree template.

    Options:

    - ``topk`` (8): candidates kept per token (the matrix width ``k``).
    - ``template`` (None: :func:`default_template`): ``(parent, rank)`` pairs, ``rank < topk``.
    - ``state_path`` (None): a safetensors file; loaded at start if it exists, written at each :meth:`end`.
    - ``vocab_size`` (None): rows of the matrix; :meth:`from_setup` passes the target's vocabulary size.
    """

    needs = frozenset({"target_logits"})

    def __init__(
        self,
        topk: int = 8,
        template: Template | None = None,
        state_path: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.topk = int(topk)
        if self.topk < 1:
            raise InvalidRequestError(f"recycle drafter option topk must be >= 1, got {topk!r}")
        self.template = _check_template(template if template is not None else default_template(k=self.topk), self.topk)
        self.state_path = state_path
        self.matrix: np.ndarray | None = None
        if vocab_size is not None:
            self._ensure_rows(int(vocab_size))
        if state_path and Path(state_path).is_file():
            self.load(state_path)

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> RecycleDrafter:
        options = dict(setup.options)
        options.setdefault("vocab_size", getattr(setup.target, "vocab_size", None))
        return cls(**options)

    # -- the matrix --
    def _ensure_rows(self, rows: int) -> np.ndarray:
        """Create the matrix or grow it to at least ``rows`` rows (new rows unknown: -1)."""
        if self.matrix is None:
            self.matrix = np.full((rows, self.topk), -1, dtype=np.int32)
        elif self.matrix.shape[0] < rows:
            extra = np.full((rows - self.matrix.shape[0], self.topk), -1, dtype=np.int32)
            self.matrix = np.concatenate([self.matrix, extra])
        return self.matrix

    def candidates(self, token: int) -> list[int]:
        """The known candidates after ``token``, best first."""
        if self.matrix is None or not 0 <= token < self.matrix.shape[0]:
            return []
        return [t for t in self.matrix[token].tolist() if t >= 0]

    def update(self, row_tokens: list[int], logits: torch.Tensor) -> None:
        """``M[row_tokens[r]] = topk(logits[r])`` for every row (a later row wins for a repeated token)."""
        vocab = int(logits.shape[-1])
        matrix = self._ensure_rows(max(vocab, max(row_tokens) + 1))
        k = min(self.topk, vocab)
        top = torch.topk(logits.detach().float(), k, dim=-1).indices.to("cpu", torch.int32).numpy()
        rows = np.full((len(row_tokens), self.topk), -1, dtype=np.int32)
        rows[:, :k] = top
        matrix[np.asarray(row_tokens, dtype=np.int64)] = rows

    def seed_bigrams(self, tokens: list[int]) -> None:
        """For each adjacent pair ``(a, b)``, put ``b`` in the first unknown slot of row ``a`` if absent."""
        if len(tokens) < 2:
            return
        matrix = self._ensure_rows(max(tokens) + 1)
        for a, b in zip(tokens[:-1], tokens[1:]):
            row = matrix[a]
            if b in row:
                continue
            free = np.flatnonzero(row < 0)
            if free.size:
                row[free[0]] = b

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the matrix to a safetensors file (atomically: a temporary file, then a rename)."""
        if self.matrix is None:
            return
        tmp = f"{path}.tmp"
        save_file({"matrix": torch.from_numpy(self.matrix)}, tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read a matrix written by :meth:`save`; its width must equal ``topk``."""
        try:
            matrix = load_file(str(path))["matrix"].numpy().astype(np.int32)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InvalidRequestError(f"cannot read recycle state {str(path)!r}: {exc}") from exc
        if matrix.ndim != 2 or matrix.shape[1] != self.topk:
            raise InvalidRequestError(
                f"recycle state {str(path)!r} has shape {tuple(matrix.shape)}, expected [V, {self.topk}]"
            )
        rows = max(matrix.shape[0], 0 if self.matrix is None else self.matrix.shape[0])
        self.matrix = None
        self._ensure_rows(rows)[: matrix.shape[0]] = matrix

    # -- the drafter protocol --
    def begin(self, ctx: DraftContext) -> None:
        self.seed_bigrams([int(t) for t in ctx.tokens])

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        if outcome.logits is None:
            return
        root_index = len(ctx.tokens) - len(outcome.result.tokens) - 1
        if root_index < 0:
            return
        row_tokens = [int(ctx.tokens[root_index])] + outcome.tree.tokens.tolist()
        self.update(row_tokens, outcome.logits[: len(row_tokens)])

    def end(self) -> None:
        if self.state_path:
            self.save(self.state_path)

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        if budget <= 0 or not ctx.tokens:
            return DraftTree.empty()
        return self.expand(int(ctx.tokens[-1]), budget)

    def expand(self, root: int, budget: int) -> DraftTree:
        """Fill the template breadth-first from ``root``; nodes with an unknown token are skipped together
        with their subtrees, and the first ``budget`` known nodes are kept."""
        tokens: list[int] = []
        parents: list[int] = []
        placed: list[int] = []  # template node -> tree node, or _SKIPPED
        seen: set[tuple[int, int]] = set()
        for parent, rank in self.template:
            if len(tokens) >= budget:
                break
            tree_parent = -1 if parent < 0 else placed[parent]
            if tree_parent == _SKIPPED:
                placed.append(_SKIPPED)
                continue
            token = self._child(root if tree_parent < 0 else tokens[tree_parent], rank)
            if token < 0 or (tree_parent, token) in seen:
                placed.append(_SKIPPED)
                continue
            seen.add((tree_parent, token))
            placed.append(len(tokens))
            tokens.append(token)
            parents.append(tree_parent)
        return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def _child(self, token: int, rank: int) -> int:
        matrix = self.matrix
        if matrix is None or not 0 <= token < matrix.shape[0]:
            return -1
        return int(matrix[token, rank])


def _check_template(template: Template, topk: int) -> Template:
    checked: Template = []
    for i, (parent, rank) in enumerate(template):
        parent, rank = int(parent), int(rank)
        if not -1 <= parent < i or not 0 <= rank < topk:
            raise InvalidRequestError(
                f"recycle template entry {i} = ({parent}, {rank}) needs -1 <= parent < {i} and 0 <= rank < {topk}"
            )
        checked.append((parent, rank))
    return checked
