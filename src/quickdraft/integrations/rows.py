"""Per-row drafter state for an engine that names batch rows, not requests (vLLM's proposer interface).

Terms:

- **row**: an index into the engine's batch. The engine gives, each step, every row's tokens so far
  (prompt and committed tokens); it does not say which request a row holds, and a row may hold another
  request from one step to the next (a request finished, the batch was compacted, a request was preempted).
- **row state**: one drafter and the tokens it has seen, for the request a row held when last seen.
- A row's tokens **extend** a state when the state's tokens are their prefix: the same request, some tokens
  later. Otherwise the row holds another request: a state that some other row's tokens extend is moved there
  (the engine moved that request), else a fresh drafter starts. States no row claims are released
  (``Drafter.end``), so one request's history never reaches another's drafts.

Each step the tokens committed since a state's last proposal are shown to its drafter as the outcome of
verifying that proposal (``Drafter.observe``), as quickdraft's engine does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from quickdraft.drafters.base import DraftContext, Drafter, StepOutcome
from quickdraft.types import DraftTree, SamplingParams, VerifyResult

GREEDY = SamplingParams()
#: A row's tokens: a list, or (from vLLM) a 1-D numpy view of its token-id array.
Tokens = Sequence[int] | np.ndarray
#: A drafter is asked for a tree of this many times the chain length: drafters that keep part of their budget
#: for side branches (``suffix``) then still fill the first chain.
TREE_FACTOR = 4


@dataclass
class RowState:
    """One request's drafter as seen through a row: ``tokens`` are the request's tokens at the last step
    (``array`` holds the same, for comparing in one vectorised step); ``chain`` is the draft proposed then
    (None before the first proposal)."""

    drafter: Drafter
    tokens: list[int]
    prompt_len: int
    chain: DraftTree | None = None
    array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.tokens, dtype=np.int64)

    def extended_by(self, tokens: Tokens) -> bool:
        """Whether ``tokens`` continue this state's request (its tokens are their prefix)."""
        n = len(self.tokens)
        return len(tokens) >= n and bool(np.array_equal(np.asarray(tokens[:n]), self.array))

    def extend(self, tokens: Tokens) -> list[int]:
        """Append the tokens of ``tokens`` past this state's (already checked to extend it); returns them."""
        new = np.asarray(tokens[len(self.tokens):], dtype=np.int64)
        self.array = np.concatenate([self.array, new])
        committed = new.tolist()
        self.tokens.extend(committed)
        return committed


def accepted_prefix(chain: DraftTree, committed: list[int]) -> int:
    """How many of ``chain``'s tokens the target accepted, given the tokens it ``committed`` in that step
    (accepted draft tokens, then one of its own)."""
    drafted = chain.tokens.tolist()
    n = 0
    while n < len(drafted) and n < len(committed) - 1 and drafted[n] == committed[n]:
        n += 1
    return n


class RowDrafters:
    """Drafter state per batch row; :meth:`propose` takes every row's tokens and returns each row's chain.

    ``make_drafter()`` builds a drafter for a new request; ``max_tokens`` caps every chain."""

    def __init__(self, make_drafter: Callable[[], Drafter], max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.make_drafter = make_drafter
        self.max_tokens = max_tokens
        self.states: dict[int, RowState] = {}

    def propose(self, rows: Sequence[Tokens | None], limits: Sequence[int] | None = None) -> list[list[int]]:
        """Chains for a step: ``rows[i]`` is row ``i``'s tokens, or None where the row drafts nothing this step
        (its state is kept as it is); ``limits[i]`` (optional) caps row ``i``'s chain further. Rows past
        ``len(rows)`` are empty: their states are released. Returns one list of token ids per row."""
        self._assign(rows)
        drafts: list[list[int]] = []
        for row, tokens in enumerate(rows):
            limit = self.max_tokens if limits is None else min(self.max_tokens, int(limits[row]))
            if tokens is None or limit <= 0:
                drafts.append([])
                continue
            drafts.append(self._draft(self.states[row], tokens, limit))
        return drafts

    def release_all(self) -> None:
        """End every request's drafter (the engine shuts down)."""
        for state in self.states.values():
            state.drafter.end()
        self.states = {}

    def _assign(self, rows: Sequence[Tokens | None]) -> None:
        """Give each row with tokens the state of its request: its own, one moved from another row, or new;
        release the states left over."""
        kept: dict[int, RowState] = {}
        loose: list[RowState] = []
        for row, state in self.states.items():
            tokens = rows[row] if row < len(rows) else None
            if row < len(rows) and (tokens is None or state.extended_by(tokens)):
                kept[row] = state
            else:
                loose.append(state)
        for row, tokens in enumerate(rows):
            if tokens is None or row in kept:
                continue
            kept[row] = self._claim(loose, tokens)
        for state in loose:
            state.drafter.end()
        self.states = kept

    def _claim(self, loose: list[RowState], tokens: Tokens) -> RowState:
        """The loose state (longest history first) that ``tokens`` extend, taken out of ``loose``; else a new
        state whose drafter begins on ``tokens``."""
        for state in sorted(loose, key=lambda s: -len(s.tokens)):
            if state.extended_by(tokens):
                loose.remove(state)
                return state
        drafter = self.make_drafter()
        state = RowState(drafter, np.asarray(tokens, dtype=np.int64).tolist(), len(tokens))
        drafter.begin(DraftContext(state.tokens, state.prompt_len, GREEDY))
        return state

    def _draft(self, state: RowState, tokens: Tokens, limit: int) -> list[int]:
        """Show the state's drafter the tokens committed since its last chain, then ask for the next chain."""
        committed = state.extend(tokens)
        ctx = DraftContext(state.tokens, state.prompt_len, GREEDY)
        if state.chain is not None and committed:
            accepted = accepted_prefix(state.chain, committed)
            result = VerifyResult(list(range(accepted)), committed, state.chain.size)
            state.drafter.observe(ctx, StepOutcome(state.chain, result))
        chain = state.drafter.propose(ctx, limit * TREE_FACTOR).first_chain().truncated(limit)
        state.chain = chain
        return chain.tokens.tolist()
