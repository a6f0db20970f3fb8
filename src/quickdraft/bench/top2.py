"""The target's top-2 logits at each position plain decoding (``ar``) generates, recorded while it decodes.

The *top-2 gap* at a generated position is the largest logit minus the second largest, in the very forward
that chose the token at that position. In plain decoding the prompt's prefill chooses token 0 and the i-th
verification forward (one row: the previous token, no draft) chooses token i. Recording the gap from those
forwards, rather than recomputing it with a fresh forward over the same context, matters: a prefill over
many rows rounds differently from a one-row decode step, so a recomputed gap is not the one ``ar`` decided on
(at a near-tie it can even name another top-1 token).

:class:`Top2Recorder` wraps a :class:`~quickdraft.models.base.TargetModel`; every session it opens records,
per forward, ``torch.topk`` of the logits row that chose the next token (two values and two ids, left on the
device until :meth:`Top2Recorder.take` copies them to the host, so no step waits for a copy). No full logits
row is kept. The host time spent recording is summed in :attr:`Top2Recorder.seconds`, so a timer around the
generation can leave it out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from quickdraft.models.base import ForwardOutput, TargetModel, TargetSession
from quickdraft.types import DraftTree


@dataclass(frozen=True)
class Top2:
    """The two largest logits at one position: ``gap`` = top-1 logit minus top-2 logit (>= 0), and the
    token ids ``top1`` and ``top2`` that carry them."""

    gap: float
    top1: int
    top2: int


class Top2Recorder:
    """A target model that records the top-2 logits of every forward of plain decoding (see the module
    docstring); attributes other than :meth:`new_session` are the wrapped target's.

    Record one generation at a time: :meth:`reset` before it, :meth:`take` after it.
    """

    def __init__(self, target: TargetModel) -> None:
        self.target = target
        self.seconds = 0.0
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def new_session(self, max_len: int) -> _RecordingSession:
        return _RecordingSession(self.target.new_session(max_len), self)

    def record(self, logits: torch.Tensor) -> None:
        """Keep the top-2 of ``logits`` (``[V]``, the row that chooses the next token)."""
        started = time.perf_counter()
        values, indices = torch.topk(logits.reshape(-1), 2)
        self._steps.append((values, indices))
        self.seconds += time.perf_counter() - started

    def reset(self) -> None:
        """Forget what was recorded, and the time spent recording it."""
        self._steps.clear()
        self.seconds = 0.0

    def take(self) -> list[Top2]:
        """The recorded :class:`Top2` per generated position, in order; the recording starts over."""
        steps, self._steps = self._steps, []
        if not steps:
            return []
        values = torch.stack([v for v, _ in steps]).float().tolist()
        indices = torch.stack([i for _, i in steps]).tolist()
        return [Top2(high - low, first, second) for (high, low), (first, second) in zip(values, indices)]


class _RecordingSession:
    """A target session that hands its recorder the logits of each forward choosing a token; every other
    attribute is the wrapped session's."""

    def __init__(self, session: TargetSession, recorder: Top2Recorder) -> None:
        self.session = session
        self.recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        logits = self.session.prefill(prompt_ids)
        self.recorder.record(logits)
        return logits

    def verify(self, root: int, tree: DraftTree, hidden_layers: tuple[int, ...] = ()) -> ForwardOutput:
        if tree.size:
            raise ValueError("Top2Recorder records plain decoding only (an empty draft every step)")
        out = self.session.verify(root, tree, hidden_layers)
        self.recorder.record(out.logits[0])
        return out
