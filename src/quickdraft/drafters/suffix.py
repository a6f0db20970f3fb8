"""The ``suffix`` drafter: SAM-Decoding (Hu et al. 2024, "SAM Decoding: Speculative Decoding via Suffix
Automaton", arXiv:2411.10666). Training-free and deterministic (``draft_probs`` is None).

A suffix automaton (see :mod:`quickdraft.drafters.datastore` for the terms) is built over the prompt and
every committed token, one token at a time (O(1) amortised each). To draft, the drafter takes the **match**:
the longest suffix of the sequence that occurred earlier, and proposes the tokens that followed its most
recent earlier occurrence (the **primary path**). When the match was followed by different tokens at other
occurrences (several transitions out of its state), each other continuation becomes a shorter **side branch**
of the draft tree, most recent first.

Optionally a static **datastore** (an automaton over a corpus, built by :func:`index_corpus`) is matched
against the same sequence; whichever source has the longer match gives the primary path and its branches, and
the other source's continuation is added as one more branch. The datastore is loaded once and shared by all
requests (at most about 60 bytes per corpus token; see
:class:`~quickdraft.drafters.datastore.StaticAutomaton`); the per-request automaton (at most ``2n`` states for
``n`` tokens) is freed in :meth:`SuffixDrafter.end`.
"""

from __future__ import annotations

import heapq

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, StepOutcome
from quickdraft.drafters.datastore import (
    Automaton,
    StaticAutomaton,
    SuffixAutomaton,
    advance,
    build_datastore,
    index_corpus,
    load_datastore,
)
from quickdraft.errors import InvalidRequestError
from quickdraft.types import DraftTree

__all__ = ["SuffixDrafter", "build_datastore", "index_corpus", "load_datastore"]

#: Match lengths from this on are reported as one evidence level (longer matches predict alike).
LONG_MATCH = 8


@register("suffix")
class SuffixDrafter(Drafter):
    """Draft the continuation of the longest earlier match of the sequence's suffix.

    Options:

    - ``max_depth`` (16): longest primary path, in tokens.
    - ``max_branches`` (4): most continuations of the match proposed (primary path included).
    - ``branch_depth`` (4): longest side branch, in tokens.
    - ``min_match`` (1): shortest match (in tokens) worth drafting from.
    - ``datastore`` (None): path of a datastore ``.npz`` built by :func:`index_corpus` / ``quickdraft index``,
      or a loaded one (the server loads it once and gives it to the drafter of every batch slot).
    """

    def __init__(
        self,
        max_depth: int = 16,
        max_branches: int = 4,
        branch_depth: int = 4,
        min_match: int = 1,
        datastore: str | StaticAutomaton | None = None,
    ) -> None:
        self.max_depth = _positive("max_depth", max_depth)
        self.max_branches = _positive("max_branches", max_branches)
        self.branch_depth = _positive("branch_depth", branch_depth)
        self.min_match = _positive("min_match", min_match)
        self.datastore = load_datastore(datastore) if isinstance(datastore, str) else datastore
        self._reset()

    def _reset(self) -> None:
        self._sam: SuffixAutomaton | None = None
        self._consumed = 0
        self._static_state = 0
        self._static_len = 0

    def begin(self, ctx: DraftContext) -> None:
        self._reset()
        self._sync(ctx)

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        self._sync(ctx)

    def end(self) -> None:
        self._reset()

    def _sync(self, ctx: DraftContext) -> None:
        """Feed the tokens of ``ctx.tokens`` not yet consumed (a shorter sequence means a new request)."""
        if self._sam is None or len(ctx.tokens) < self._consumed:
            self._reset()
            self._sam = SuffixAutomaton()
        for token in ctx.tokens[self._consumed :]:
            self._sam.extend(token)
            if self.datastore is not None:
                self._static_state, self._static_len = advance(
                    self.datastore, self._static_state, self._static_len, int(token)
                )
        self._consumed = len(ctx.tokens)

    def evidence(self, ctx: DraftContext) -> int:
        """The length of the match the next proposal continues (0: none), capped at ``LONG_MATCH``."""
        self._sync(ctx)
        return min(max((source[0] for source in self._sources()), default=0), LONG_MATCH)

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        self._sync(ctx)
        if budget <= 0:
            return DraftTree.empty()
        sources = self._sources()
        if not sources:
            return DraftTree.empty()
        best, *rest = sorted(sources, key=lambda s: -s[0])  # stable: the dynamic match wins ties
        _, automaton, state, anchor_pos = best
        primary, sides = self._continuations(automaton, state, anchor_pos)
        for _, other, _state, other_pos in rest:
            sides.append(other.continuation(other_pos, self.branch_depth))
        return _tree(primary, sides, budget)

    def _sources(self) -> list[tuple[int, Automaton, int, int]]:
        """(match length, automaton, match state, earlier end position) for each source with a match."""
        found: list[tuple[int, Automaton, int, int]] = []
        sam = self._sam
        if sam is not None and sam.anchor_length >= self.min_match:
            found.append((sam.anchor_length, sam, sam.anchor, sam.anchor_pos))
        store = self.datastore
        if store is not None and self._static_len >= self.min_match:
            state = self._static_state
            found.append((self._static_len, store, state, store.endpos_of(state)))
        return found

    def _continuations(self, automaton: Automaton, state: int, anchor_pos: int) -> tuple[list[int], list[list[int]]]:
        """The primary path (after ``anchor_pos``) and side branches: the other transitions out of ``state``,
        each followed by the tokens after its recorded occurrence, most recent first."""
        primary = automaton.continuation(anchor_pos, self.max_depth)
        first = primary[0] if primary else None
        others = [(automaton.endpos_of(t), tok) for tok, t in automaton.edges(state) if tok != first and tok >= 0]
        recent = heapq.nlargest(self.max_branches - 1, others)
        sides = [[tok] + automaton.continuation(pos, self.branch_depth - 1) for pos, tok in recent]
        return primary, sides


def _tree(primary: list[int], sides: list[list[int]], budget: int) -> DraftTree:
    """Merge the paths into a tree of at most ``budget`` nodes; side branches get at most half the budget."""
    side_nodes = sum(len(s) for s in sides)
    reserve = min(side_nodes, budget // 2)
    paths = [primary[: budget - reserve]] + sides
    return DraftTree.from_paths([p for p in paths if p]).truncated(budget)


def _positive(name: str, value: int | str) -> int:
    number = int(value)
    if number < 1:
        raise InvalidRequestError(f"suffix drafter option {name} must be an integer >= 1, got {value!r}")
    return number
