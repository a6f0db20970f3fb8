"""Losslessness report: every method's tokens against the baseline ``ar``'s, generation by generation.

For each generation whose tokens differ from ``ar``'s on the same prompt, the report gives the first
position where they differ and the target's top-2 logit gap there: the largest logit minus the second
largest in the forward with which ``ar`` itself chose its token at that position, recorded while ``ar``
decoded (:mod:`quickdraft.bench.top2`; no forward is run for the report). A tiny gap means the two choices
were nearly tied, so a rounding difference between a one-row and a many-row forward can flip it (a numerical
near-tie, not a verification bug); a large gap at a greedy divergence points at a real bug. The gap is
``None`` where ``ar``'s output carries no recording (a runner that does not record).

With sampling (temperature > 0) methods draw different random numbers, so outputs may differ even when
every method samples exactly the target distribution: the count is then informative only, not a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quickdraft.bench.harness import BenchRun
from quickdraft.bench.runners import MethodOutput
from quickdraft.bench.top2 import Top2


@dataclass(frozen=True)
class Divergence:
    """Where a method's output first differs from the baseline's on one generation.

    ``position`` counts new tokens from 0. ``baseline_token``/``method_token`` are the tokens chosen there;
    ``None`` means that output ended there (end of sequence) while the other went on.
    """

    method: str
    question_id: int | str
    group: str
    turn: int
    position: int
    baseline_token: int | None
    method_token: int | None
    top2_gap: float | None = None
    top1_token: int | None = None
    top2_token: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """How many of a method's generations equal the baseline's token for token, and where the rest diverge."""

    identical: int = 0
    total: int = 0
    divergences: list[Divergence] = field(default_factory=list)


def first_divergence(baseline: Sequence[int], other: Sequence[int]) -> int | None:
    """The first index where the two token lists differ (a proper prefix differs at its end); None if equal."""
    for i, (a, b) in enumerate(zip(baseline, other)):
        if a != b:
            return i
    if len(baseline) == len(other):
        return None
    return min(len(baseline), len(other))


def compare_to_baseline(run: BenchRun) -> dict[str, Comparison]:
    """A :class:`Comparison` per method (the baseline compares with itself), with ``ar``'s recorded gaps."""
    baseline = run.outputs(run.baseline)
    result: dict[str, Comparison] = {m: Comparison() for m in run.methods}
    for record in run.records:
        reference = baseline[(record.question_id, record.turn)]
        tokens = record.output.token_ids
        comparison = result[record.method]
        comparison.total += 1
        position = first_divergence(reference.token_ids, tokens)
        if position is None:
            comparison.identical += 1
            continue
        top2 = recorded_top2(reference, position)
        comparison.divergences.append(
            Divergence(
                method=record.method,
                question_id=record.question_id,
                group=record.group,
                turn=record.turn,
                position=position,
                baseline_token=reference.token_ids[position] if position < len(reference.token_ids) else None,
                method_token=tokens[position] if position < len(tokens) else None,
                top2_gap=top2.gap if top2 else None,
                top1_token=top2.top1 if top2 else None,
                top2_token=top2.top2 if top2 else None,
            )
        )
    return result


def recorded_top2(output: MethodOutput, position: int) -> Top2 | None:
    """The top-2 logits recorded in ``output``'s generation at ``position``; None if not recorded."""
    if output.top2 is None or position >= len(output.top2):
        return None
    return output.top2[position]
