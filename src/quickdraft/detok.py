"""Incremental detokenization with stop strings: turns committed token ids into safe-to-show text."""

from __future__ import annotations

from typing import Any


class TextAssembler:
    """Accumulates generated token ids and releases text that will not change any more.

    Text is held back while it ends in an incomplete UTF-8 sequence (shown as U+FFFD) or could be the
    start of a stop string; once a stop string appears, the text is cut just before it."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.token_ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly releasable text (possibly empty). Sets ``stopped`` on a stop string."""
        self.token_ids.extend(token_ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_position()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(self._safe_end())

    def finish(self) -> str:
        """Release everything still held back (generation has ended)."""
        return self._release(len(self.text))

    def _stop_position(self) -> int | None:
        positions = [self.text.find(s, max(0, self.released - len(s))) for s in self.stop]
        found = [p for p in positions if p >= 0]
        return min(found) if found else None

    def _safe_end(self) -> int:
        end = len(self.text)
        while end > self.released and self.text[end - 1] == "\ufffd":
            end -= 1
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end - self.released), 0, -1):
                if self.text[:end].endswith(stop[:size]):
                    end -= size
                    break
        return max(end, self.released)

    def _release(self, end: int) -> str:
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece
