"""How many draft nodes to verify per step, chosen to fit the hardware.

Verifying ``n`` draft nodes costs one target forward over ``n + 1`` rows, whose time relative to a 1-row
forward is the **verification cost curve** ``c(n + 1)`` (``quickdraft profile`` prints it). A step then
commits ``1 + a(n)`` tokens on average, where ``a(n)`` is the drafter's mean accepted length when given
``n`` nodes. The policy picks the budget that maximises committed tokens per unit of time,

    n* = argmax_n (1 + a(n)) / c(n + 1),

estimating ``a(n)`` online for a ladder of budgets (an exponential moving average per budget) and
exploring a neighbouring budget now and then (epsilon-greedy with a seeded RNG, so runs are repeatable).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quickdraft.models.base import TargetModel
from quickdraft.types import DraftTree

DEFAULT_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class CostCurve:
    """``c(rows)``: time of a forward over ``rows`` new rows divided by the time over one row."""

    rows: tuple[int, ...]
    relative_cost: tuple[float, ...]

    def __call__(self, rows: int) -> float:
        return float(np.interp(rows, self.rows, self.relative_cost))

    @classmethod
    def flat(cls) -> CostCurve:
        """The curve of an idealised accelerator where verifying up to 64 rows is free."""
        return cls((1, 65), (1.0, 1.0))

    @classmethod
    def measure(cls, target: TargetModel, rows: Sequence[int] = (1, 2, 4, 8, 16, 32, 65),
                context: int = 256, rounds: int = 5) -> CostCurve:
        """Time chain verifications of each size on a ``context``-token cache.

        Sizes are visited round-robin ``rounds`` times so that drift hits all alike; each size keeps its
        fastest time (other load on the machine only ever adds time), and the curve is made non-decreasing,
        as a forward over more rows never costs less."""
        context = min(context, max(1, target.max_context - max(rows) - 1))
        session = target.new_session(context + max(rows) + 1)
        session.prefill([1] * context)
        best = [float("inf")] * len(rows)
        for _ in range(rounds + 1):
            for index, count in enumerate(rows):
                start = time.perf_counter()
                session.verify(1, DraftTree.chain([1] * (count - 1)))
                _synchronize(target.device)
                best[index] = min(best[index], time.perf_counter() - start)
                session.truncate(context)
        session.close()
        relative = np.maximum.accumulate(np.array(best) / best[0])
        return cls(tuple(rows), tuple(float(c) for c in relative))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BudgetPolicy:
    """Chooses the number of draft nodes per step (see the module docstring)."""

    def __init__(self, curve: CostCurve, max_budget: int = 64, ladder: Sequence[int] = DEFAULT_LADDER,
                 explore: float = 0.1, smoothing: float = 0.1, seed: int = 0) -> None:
        self.curve = curve
        self.ladder = [n for n in ladder if n <= max_budget] or [max_budget]
        self.explore = explore
        self.smoothing = smoothing
        self.accepted: dict[int, float] = {}
        self._rng = random.Random(seed)

    def choose(self, limit: int | None = None) -> int:
        """The budget for the next step, at most ``limit``."""
        arms = [n for n in self.ladder if limit is None or n <= limit] or [min(self.ladder)]
        best = max(arms, key=self.score)
        if self._rng.random() < self.explore:
            index = arms.index(best) + self._rng.choice((-1, 1))
            return arms[min(max(index, 0), len(arms) - 1)]
        return best

    def score(self, budget: int) -> float:
        """Expected committed tokens per unit of verification time with ``budget`` nodes."""
        return (1.0 + self.expected_accepted(budget)) / self.curve(budget + 1)

    def expected_accepted(self, budget: int) -> float:
        """The moving average for ``budget`` once tried; before that an optimistic guess from the nearest
        tried budgets (acceptance grows with the budget but never beyond it)."""
        if budget in self.accepted:
            return self.accepted[budget]
        below = [n for n in self.accepted if n < budget]
        above = [n for n in self.accepted if n > budget]
        if below:
            nearest = max(below)
            return min(float(budget), self.accepted[nearest] * 1.25 + 0.25)
        if above:
            return self.accepted[min(above)]
        return min(float(budget), 2.0)

    def update(self, budget: int, accepted: int) -> None:
        """Record that a step with ``budget`` nodes had ``accepted`` draft tokens accepted."""
        if budget not in self.ladder:
            return
        previous = self.accepted.get(budget)
        self.accepted[budget] = accepted if previous is None else previous + self.smoothing * (accepted - previous)
