"""Aggregate metrics of a benchmark run: throughput, speedup, tau, per task group and overall.

Definitions (all aggregates are ratios of sums, never means of per-question ratios):

- **tokens/s** = total new tokens / total timed seconds over the generations considered;
- **speedup** = a method's aggregate tokens/s / the baseline ``ar``'s aggregate tokens/s over the same
  generations of the same run;
- **tau** (mean accepted tokens) = total committed tokens / total target forwards (see
  :mod:`quickdraft.types`); ``ar`` has tau 1.00. Unknown (``None``) for peers, which do not report forwards;
- **nodes per step** = mean rows of a verification forward = (draft tokens verified + verification
  forwards) / verification forwards, where verification forwards = target forwards - 1 per generation (the
  prefill forward verifies nothing); 1.00 for ``ar``. This is the k at which to read the cost curve c(k);
- **draft seconds fraction** = time spent drafting / total time, when the engine reports drafting time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from quickdraft.bench.harness import BenchRun, Record
from quickdraft.bench.runners import MethodOutput


@dataclass(frozen=True)
class Totals:
    """Sums over a set of generations of one method, and the ratios derived from them."""

    generations: int
    new_tokens: int
    seconds: float
    committed_tokens: int | None
    target_forwards: int | None
    drafted_tokens: int | None
    draft_seconds: float | None

    @classmethod
    def of(cls, outputs: Iterable[MethodOutput]) -> Totals:
        outputs = list(outputs)

        def total(values: list) -> int | float | None:
            return None if not values or any(v is None for v in values) else sum(values)

        return cls(
            generations=len(outputs),
            new_tokens=sum(o.new_tokens for o in outputs),
            seconds=sum(o.seconds for o in outputs),
            committed_tokens=total([_committed(o) for o in outputs]),
            target_forwards=total([o.target_forwards for o in outputs]),
            drafted_tokens=total([o.drafted_tokens for o in outputs]),
            draft_seconds=total([o.draft_seconds for o in outputs]),
        )

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float | None:
        if self.committed_tokens is None or not self.target_forwards:
            return None
        return self.committed_tokens / self.target_forwards

    @property
    def verify_steps(self) -> int | None:
        # Each generation's first forward is its prefill; the rest verify (possibly empty) drafts.
        if self.target_forwards is None:
            return None
        return self.target_forwards - self.generations

    @property
    def nodes_per_step(self) -> float | None:
        steps = self.verify_steps
        if steps is None or steps <= 0 or self.drafted_tokens is None:
            return None
        return (self.drafted_tokens + steps) / steps

    @property
    def draft_seconds_fraction(self) -> float | None:
        if self.draft_seconds is None or self.seconds <= 0:
            return None
        return self.draft_seconds / self.seconds


def _committed(output: MethodOutput) -> int | None:
    """Committed tokens of a generation whose forwards are known (default: its new tokens)."""
    if output.target_forwards is None:
        return None
    return output.committed_tokens if output.committed_tokens is not None else output.new_tokens


def ratio(value: float, baseline: float) -> float | None:
    return value / baseline if baseline > 0 else None


@dataclass
class MethodMetrics:
    """One method's aggregate numbers, overall and per task group; speedups are against the baseline."""

    name: str
    overall: Totals
    speedup: float | None
    per_group: dict[str, Totals] = field(default_factory=dict)
    group_speedup: dict[str, float | None] = field(default_factory=dict)


def _totals(records: Iterable[Record], groups: list[str]) -> tuple[Totals, dict[str, Totals]]:
    records = list(records)
    per_group = {g: Totals.of(r.output for r in records if r.group == g) for g in groups}
    return Totals.of(r.output for r in records), per_group


def aggregate(run: BenchRun) -> dict[str, MethodMetrics]:
    """Per-method metrics of ``run``, in the run's method order."""
    groups = list(dict.fromkeys(r.group for r in run.records))
    base_overall, base_groups = _totals((r for r in run.records if r.method == run.baseline), groups)
    result: dict[str, MethodMetrics] = {}
    for method in run.methods:
        overall, per_group = _totals((r for r in run.records if r.method == method), groups)
        result[method] = MethodMetrics(
            name=method,
            overall=overall,
            speedup=ratio(overall.tokens_per_s, base_overall.tokens_per_s),
            per_group=per_group,
            group_speedup={g: ratio(per_group[g].tokens_per_s, base_groups[g].tokens_per_s) for g in groups},
        )
    return result


__all__ = ["MethodMetrics", "Totals", "aggregate", "ratio"]
