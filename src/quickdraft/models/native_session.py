"""Sequences in the native forward's KV cache, and how a verification forward lays out draft trees.

- :class:`NativeSession`: one sequence of a :class:`~quickdraft.models.native.NativeCausalLM`, with its own
  static KV cache or as a view on one row of a shared multi-row cache (a server's batch).
- :func:`verify_batch`: one tree per session verified in ONE forward, each batch row one session with its own
  cache length (ragged), its own write slots and its own tree mask, rows padded to the same width.
- :class:`DepthFirstLayout`: a draft tree's nodes in depth-first order, so that the path of first children
  sits in consecutive cache slots, where the forward is row-exact (:mod:`quickdraft.models.row_exact`).
- :class:`Placement`: where a forward's new keys and values go in the cache.
- masks here are boolean, ``[T, start + T]`` or ``[B, T, start + T]``, True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quickdraft.kv import StaticKVCache
from quickdraft.models.base import HIDDEN_STATES, LAYER_SKIP, TREE, ForwardOutput, TargetSession
from quickdraft.models.row_exact import whole_blocks
from quickdraft.tree import (
    depth_first_order,
    reordered,
    verification_mask,
    verification_positions,
    verification_tokens,
)
from quickdraft.types import DraftTree

if TYPE_CHECKING:
    from quickdraft.models.native import NativeCausalLM


@dataclass(frozen=True)
class Placement:
    """Where a forward's new keys and values go (one ``start`` for every row, or per-row ``slots``), and
    whether the forward is row-exact (:mod:`quickdraft.models.row_exact`)."""

    start: int
    end: int
    rows: slice | None
    row_exact: bool
    slots: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def span(self) -> int:
        """The cache slots a masked attention call reads: ``end`` rounded up to whole key blocks."""
        return whole_blocks(self.end)

    @classmethod
    def of(cls, cache: StaticKVCache, start: int | list[int], shape: torch.Size, rows: slice | None,
           row_exact: bool) -> Placement:
        batch, count = shape
        if isinstance(start, int):
            return cls(start, start + count, rows, row_exact)
        if len(start) != batch:
            raise ValueError(f"{len(start)} start positions for a batch of {batch} rows")
        if len(set(start)) == 1:
            return cls(start[0], start[0] + count, rows, row_exact)
        rows = rows if rows is not None else slice(0, batch)
        return cls(-1, max(start) + count, rows, row_exact, cache.ragged_slots(list(start), count, rows))


class NativeSession(TargetSession):
    """One sequence in a :class:`~quickdraft.models.native.NativeCausalLM`: by default with its own static KV
    cache; given ``cache`` and ``row``, a view on one row of a shared multi-row cache (a server's batch)."""

    capabilities = frozenset({TREE, HIDDEN_STATES, LAYER_SKIP})

    def __init__(self, model: NativeCausalLM, max_len: int = 0, cache: StaticKVCache | None = None,
                 row: int = 0) -> None:
        self.model = model
        self._owns_cache = cache is None
        self.cache = model.new_cache(max_len) if cache is None else cache
        self.row = row
        self._verify_start = 0
        self._layout = DepthFirstLayout.of(DraftTree.empty())

    @property
    def row(self) -> int:
        return self._row

    @row.setter
    def row(self, row: int) -> None:
        """Move the view to another cache row (the caller moves the entries: :meth:`StaticKVCache.move_row`)."""
        self._row = row
        self._rows = None if self._owns_cache else slice(row, row + 1)

    @property
    def shares_cache(self) -> bool:
        """Whether the session is a view on one row of a shared multi-row cache (a server's batch)."""
        return not self._owns_cache

    @property
    def cached_length(self) -> int:
        return self.cache.lengths[self._row]

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        self.cache.truncate(0, self._row)
        return self.extend(prompt_ids)

    def prefill_hidden(self, prompt_ids: list[int], hidden_layers: tuple[int, ...]) -> ForwardOutput:
        self.cache.truncate(0, self._row)
        return self._append(prompt_ids, hidden_layers)

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append ``token_ids`` to the cache; return the logits ``[V]`` after the last of them."""
        return self._append(token_ids).logits[-1]

    def _append(self, token_ids: list[int], hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Append ``token_ids`` to the cache: logits ``[1, V]`` after the last, ``hidden_layers`` of all."""
        start = self.cache.lengths[self._row]
        count = len(token_ids)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if start == 0 or count == 1 else _causal_mask(start, count).unsqueeze(0)
        out = self.model.forward(
            torch.tensor([token_ids]), positions, self.cache, start, mask, hidden_layers=hidden_layers,
            logit_rows=slice(-1, None), rows=self._rows,
        )
        self.cache.truncate(start + count, self._row)
        return out

    def truncate(self, length: int) -> None:
        self.cache.truncate(length, self._row)

    def lay_out(self, tree: DraftTree) -> DepthFirstLayout:
        """Begin verifying ``tree`` right after the committed tokens: return its layout, and remember it and
        where its rows go for :meth:`commit`. :meth:`verify` and :func:`verify_batch` then run the forward."""
        self._verify_start = self.cached_length
        self._layout = DepthFirstLayout.of(tree)
        return self._layout

    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Logits (and ``hidden_layers``) of the root and every node of ``tree``, in the tree's node order; the
        forward itself lays the nodes out depth-first (:class:`DepthFirstLayout`)."""
        start = self.cached_length
        layout = self.lay_out(tree)
        tokens, positions, tree_mask = layout.inputs(root, start)
        mask = _prefixed(tree_mask, start).unsqueeze(0) if tree.size else None
        out = self.model.forward(tokens.unsqueeze(0), positions.unsqueeze(0), self.cache, start, mask,
                                 hidden_layers=hidden_layers, rows=self._rows)
        return layout.restored(out)

    def commit(self, accepted_nodes: list[int]) -> None:
        keep = [0] + [self._layout.row(node) for node in accepted_nodes]
        self.cache.compact(self._verify_start, keep, self._row)

    def draft_forward(
        self, tokens: list[int], skip_layers: frozenset[int], hidden_layers: tuple[int, ...] = (), offset: int = 0
    ) -> ForwardOutput:
        start = self.cache.lengths[self._row] + offset
        count = len(tokens)
        positions = torch.arange(start, start + count).unsqueeze(0)
        mask = None if count == 1 else _causal_mask(start, count).unsqueeze(0)
        return self.model.forward(
            torch.tensor([tokens]), positions, self.cache, start, mask, skip_layers, hidden_layers, rows=self._rows
        )

    def close(self) -> None:
        if self._owns_cache:
            self.cache = self.model.new_cache(1)
        else:
            self.cache.truncate(0, self._row)


def verify_batch(sessions: list[NativeSession], roots: list[int], trees: list[DraftTree],
                 hidden_layers: tuple[int, ...] = ()) -> list[ForwardOutput]:
    """Verify one tree per session in ONE forward; the sessions are views on consecutive rows of one shared
    cache, each with its own committed length. Row ``b`` of the forward is session ``b``'s root and tree,
    padded to the widest tree (padding rows attend only to themselves and are dropped); its mask lets it see
    its own committed prefix and its own ancestors in the tree, nothing else. Returns each session's
    :meth:`NativeSession.verify` output; :meth:`NativeSession.commit` then works per session as usual."""
    if not sessions:
        return []
    model, cache, first = sessions[0].model, sessions[0].cache, sessions[0].row
    for offset, session in enumerate(sessions):
        if session.cache is not cache or session.row != first + offset:
            raise ValueError("verify_batch needs views on consecutive rows of one shared cache")
    starts = [session.cached_length for session in sessions]
    width = 1 + max(tree.size for tree in trees)
    span = max(starts) + width
    batch = len(sessions)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, span, dtype=torch.bool)
    layouts = []
    for b, (session, root, tree, start) in enumerate(zip(sessions, roots, trees, starts)):
        rows = tree.size + 1
        layout = session.lay_out(tree)
        layouts.append(layout)
        tokens[b, :rows], positions[b, :rows], mask[b, :rows, start : start + rows] = layout.inputs(root, start)
        positions[b, rows:] = start
        mask[b, :, :start] = True
        pad = torch.arange(rows, width)
        mask[b, pad, start + pad] = True
    out = model.forward_batch(tokens, positions, cache, starts, mask, hidden_layers=hidden_layers,
                              rows=slice(first, first + batch))
    results = []
    for b, (layout, tree) in enumerate(zip(layouts, trees)):
        rows = tree.size + 1
        own = ForwardOutput(out.logits[b, :rows], {k: v[b, :rows] for k, v in out.hidden.items()})
        results.append(layout.restored(own))
    return results


@dataclass(frozen=True)
class DepthFirstLayout:
    """A draft tree as a verification forward lays it out: its nodes in depth-first order, so that the path of
    first children (the drafter's best guess) sits in consecutive cache slots, where the forward computes it
    exactly as one-token decoding would (:mod:`quickdraft.models.row_exact`). ``rows[i]`` is the forward row
    of the tree's node ``i`` (row 0 is the root); None where depth-first order is the tree's own (chains, most
    prefix trees)."""

    tree: DraftTree
    rows: torch.Tensor | None

    @classmethod
    def of(cls, tree: DraftTree) -> DepthFirstLayout:
        order = depth_first_order(tree)
        if order == list(range(tree.size)):
            return cls(tree, None)
        rows = torch.empty(tree.size, dtype=torch.long)
        rows[torch.tensor(order, dtype=torch.long)] = torch.arange(1, tree.size + 1)
        return cls(reordered(DraftTree(tree.tokens, tree.parents), order), rows)

    def inputs(self, root: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward's token ids and positions ``[N + 1]`` and the mask among its rows ``[N + 1, N + 1]``,
        the root at position ``start``."""
        return (verification_tokens(root, self.tree), verification_positions(start, self.tree),
                verification_mask(self.tree))

    def row(self, node: int) -> int:
        return node + 1 if self.rows is None else int(self.rows[node])

    def restored(self, out: ForwardOutput) -> ForwardOutput:
        """``out``'s rows (root first, then the laid-out nodes) back in the tree's node order."""
        if self.rows is None:
            return out
        index = torch.cat([torch.zeros(1, dtype=torch.long), self.rows]).to(out.logits.device)
        return ForwardOutput(out.logits[index], {layer: value[index] for layer, value in out.hidden.items()})


def _causal_mask(start: int, count: int) -> torch.Tensor:
    """``[count, start + count]``: every new row sees the cached prefix and the new rows up to itself."""
    return _prefixed(torch.ones(count, count, dtype=torch.bool).tril(), start)


def _prefixed(mask: torch.Tensor, start: int) -> torch.Tensor:
    """Prepend ``start`` always-visible cached columns to a square mask among new rows."""
    prefix = torch.ones(mask.shape[0], start, dtype=torch.bool)
    return torch.cat([prefix, mask], dim=1)
