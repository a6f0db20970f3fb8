"""Losslessness report: every method's tokens against the baseline ``ar``'s, generation by generation.

For each generation whose tokens differ from ``ar``'s on the same prompt, the report gives the first
position where they differ and the target's top-2 logit gap there: the difference between the two largest
logits the target assigns at that position, computed by one target forward over prompt + ``ar``'s tokens
before the position. A tiny gap means the two choices were nearly tied, so a rounding difference between a
one-row and a many-row forward can flip it (a numerical near-tie, not a verification bug); a large gap at a
greedy divergence points at a real bug.

With sampling (temperature > 0) methods draw different random numbers, so outputs may differ even when
every method samples exactly the target distribution: the count is then informative only, not a test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quickdraft.bench.harness import BenchRun
from quickdraft.bench.runners import engine_target

#: context ids -> (top-1 logit minus top-2 logit, top-1 token, top-2 token) of the next position.
GapFn = Callable[[list[int]], tuple[float, int, int]]


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


def compare_to_baseline(run: BenchRun, gap_fn: GapFn | None = None) -> dict[str, Comparison]:
    """A :class:`Comparison` per method (the baseline compares with itself); ``gap_fn`` fills the gaps."""
    baseline = run.outputs(run.baseline)
    gap_cache: dict[tuple, tuple[float, int, int]] = {}
    result: dict[str, Comparison] = {m: Comparison() for m in run.methods}
    for record in run.records:
        key = (record.question_id, record.turn)
        reference = baseline[key].token_ids
        tokens = record.output.token_ids
        comparison = result[record.method]
        comparison.total += 1
        position = first_divergence(reference, tokens)
        if position is None:
            comparison.identical += 1
            continue
        gap = top1 = top2 = None
        if gap_fn is not None:
            cache_key = (key, position)
            if cache_key not in gap_cache:
                gap_cache[cache_key] = gap_fn(list(run.prompts[key]) + list(reference[:position]))
            gap, top1, top2 = gap_cache[cache_key]
        comparison.divergences.append(
            Divergence(
                method=record.method,
                question_id=record.question_id,
                group=record.group,
                turn=record.turn,
                position=position,
                baseline_token=reference[position] if position < len(reference) else None,
                method_token=tokens[position] if position < len(tokens) else None,
                top2_gap=gap,
                top1_token=top1,
                top2_token=top2,
            )
        )
    return result


def top2_gap_of(logits: torch.Tensor) -> tuple[float, int, int]:
    """(top-1 minus top-2 logit, top-1 token, top-2 token) of a ``[V]`` logit vector."""
    values, indices = torch.topk(logits.float().reshape(-1), 2)
    return float(values[0] - values[1]), int(indices[0]), int(indices[1])


def engine_gap_fn(engine: Any) -> GapFn:
    """A :data:`GapFn` that runs one forward of the engine's target model over the context.

    It uses the engine's own target (a :class:`~quickdraft.models.base.TargetModel`, see
    :func:`~quickdraft.bench.runners.engine_target`) where the engine exposes one, so the logits are those
    the engine decodes with; otherwise the transformers model ``engine.hf_model``.
    """
    target = engine_target(engine)

    def via_target(context: list[int]) -> tuple[float, int, int]:
        session = target.new_session(len(context) + 8)
        try:
            with torch.inference_mode():
                logits = session.prefill(context)
        finally:
            session.close()
        return top2_gap_of(logits)

    def via_hf(context: list[int]) -> tuple[float, int, int]:
        model = engine.hf_model
        ids = torch.tensor([context], dtype=torch.long, device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        return top2_gap_of(logits)

    return via_target if target is not None and hasattr(target, "new_session") else via_hf
