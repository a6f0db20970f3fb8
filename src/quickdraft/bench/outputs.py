"""What a benchmarked method returns (:class:`MethodOutput`) and the runner protocol every method implements;
a leaf module, so that runners living in their own modules (:mod:`quickdraft.bench.vllm_peer`) need not import
:mod:`quickdraft.bench.runners`, which imports them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from quickdraft.bench.top2 import Top2
from quickdraft.types import SamplingParams


@dataclass
class MethodOutput:
    """What one timed generation produced.

    ``target_forwards``/``committed_tokens``/``drafted_tokens`` are known for quickdraft's own methods and
    ``None`` for peers (their tau is not observable). ``draft_seconds`` is the time spent drafting, when the
    engine reports it. ``top2[i]`` is the target's :class:`~quickdraft.bench.top2.Top2` in the forward that
    chose token ``i`` (one entry more than ``token_ids`` where the output ended at end of sequence: the forward
    that chose it); recorded for ``ar`` only, ``None`` otherwise.
    """

    token_ids: list[int]
    seconds: float
    target_forwards: int | None = None
    committed_tokens: int | None = None
    drafted_tokens: int | None = None
    draft_seconds: float | None = None
    top2: list[Top2] | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


class MethodRunner(Protocol):
    name: str

    def run(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams) -> MethodOutput: ...


def cut_at_eos(token_ids: Iterable[int], eos_ids: Iterable[int]) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    eos = set(eos_ids)
    out = []
    for token in token_ids:
        if token in eos:
            break
        out.append(int(token))
    return out
