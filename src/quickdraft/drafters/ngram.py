"""Prompt lookup decoding (Saxena 2023; "PLD" in Spec-Bench): draft by copying.

The drafter finds the most recent earlier occurrence of the sequence's last ``n`` tokens (trying
``n = max_ngram`` down to ``min_ngram``) in the prompt and the generated text, and proposes the tokens that
followed that occurrence. It needs no model and no training; it shines when the answer repeats the prompt
(summarisation, retrieval-augmented QA, code editing).
"""

from __future__ import annotations

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter
from quickdraft.types import DraftTree


@register("ngram")
class NgramDrafter(Drafter):
    """Prompt lookup. Options: ``max_ngram`` (longest suffix tried, default 3), ``min_ngram`` (default 1)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= int(min_ngram) <= int(max_ngram):
            raise ValueError("ngram drafter needs 1 <= min_ngram <= max_ngram")
        self.max_ngram = int(max_ngram)
        self.min_ngram = int(min_ngram)
        self._last_start: dict[tuple[int, ...], int] = {}
        self._indexed = 0

    def begin(self, ctx: DraftContext) -> None:
        self._last_start = {}
        self._indexed = 0

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        tokens = ctx.tokens
        self._index_until(tokens, len(tokens) - 1)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self._last_start.get(tuple(tokens[-n:]))
            if start is not None:
                follow = start + n
                return DraftTree.chain(tokens[follow : follow + budget])
        return DraftTree.empty()

    def _index_until(self, tokens: list[int], end: int) -> None:
        """Record, for every n-gram that starts before ``end`` and has a following token, its latest start."""
        for position in range(self._indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if position - n + 1 < 0:
                    break
                self._last_start[tuple(tokens[position - n + 1 : position + 1])] = position - n + 1
        self._indexed = max(self._indexed, end)

    def end(self) -> None:
        self._last_start = {}
        self._indexed = 0
