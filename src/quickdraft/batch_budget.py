"""How much to speculate when many sequences share one target forward.

A batched verification forward over ``B`` sequences, each given ``b`` draft nodes, runs ``B * (1 + b)`` rows
(rows are padded to the widest tree) and costs ``c(B * (1 + b))`` times a 1-row forward, where ``c`` is the
measured :class:`~quickdraft.budget.CostCurve` (extrapolated beyond its last point). Sequence ``i`` then
commits ``1 + E[accepted_i(b)]`` tokens.
The policy picks the per-sequence budget

    b* = argmax_b  sum_i (1 + E[accepted_i(min(b, room_i))])  /  c(B * (1 + max_i min(b, room_i))),

where ``room_i`` is how many more tokens sequence ``i`` may still produce after the bonus token. On an
accelerator ``c`` is nearly flat up to hundreds of rows and ``b*`` stays large; on a CPU ``c`` grows almost
linearly once the batch is a few rows wide, and ``b*`` shrinks with the batch, down to 0 (plain batched
decoding) when speculation no longer pays.

``E[accepted_i(b)]`` comes from each sequence's observed per-node acceptance rate ``alpha_i`` (the chance that
the next draft token is accepted given the previous one was), assuming independent nodes along a chain:
``E = alpha + alpha^2 + ... + alpha^b``. ``alpha_i`` is estimated as accepted / tried nodes, where a step that
accepted ``a`` of ``n`` drafted nodes tried ``a + 1`` of them (``a`` when all were accepted), smoothed towards a
prior: the running mean acceptance of finished sequences, so a new sequence starts from what the drafter
usually achieves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quickdraft.budget import CostCurve, chain_accepted

#: Per-sequence budgets considered, 0 meaning no speculation.
BATCH_LADDER = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class AcceptanceEstimate:
    """One sequence's observed draft acceptance: accepted nodes and tried nodes (see the module docstring)."""

    accepted: int = 0
    tried: int = 0

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.accepted += accepted
        self.tried += accepted + (1 if accepted < drafted else 0)

    def rate(self, prior: float, weight: float) -> float:
        return (self.accepted + weight * prior) / (self.tried + weight)


class BatchBudgetPolicy:
    """Chooses one draft budget per step for a whole batch (see the module docstring)."""

    def __init__(self, curve: CostCurve, max_budget: int = 16, ladder: Sequence[int] = BATCH_LADDER,
                 prior: float = 0.5, prior_weight: float = 4.0, smoothing: float = 0.05) -> None:
        self.curve = curve
        self.ladder = [b for b in ladder if b <= max_budget]
        self.prior = prior
        self.prior_weight = prior_weight
        self.smoothing = smoothing

    def rate(self, estimate: AcceptanceEstimate) -> float:
        return estimate.rate(self.prior, self.prior_weight)

    def score(self, budget: int, rates: Sequence[float], rooms: Sequence[int]) -> float:
        """Expected committed tokens per unit of forward time when every sequence gets ``budget`` nodes."""
        budgets = [max(0, min(budget, room)) for room in rooms]
        tokens = sum(1.0 + chain_accepted(alpha, b) for alpha, b in zip(rates, budgets))
        rows = len(budgets) * (1 + max(budgets, default=0))
        return tokens / self.curve(rows, extrapolate=True)

    def choose(self, rates: Sequence[float], rooms: Sequence[int]) -> int:
        """The per-sequence budget for the next step (each sequence still gets at most its room)."""
        if not rates or not self.ladder:
            return 0
        best, best_score = 0, self.score(0, rates, rooms)
        for budget in self.ladder[1:]:
            score = self.score(budget, rates, rooms)
            if score > best_score * 1.0001:
                best, best_score = budget, score
        return best

    def finished(self, estimate: AcceptanceEstimate) -> None:
        """A sequence ended: move the prior towards its observed acceptance."""
        if estimate.tried:
            observed = estimate.accepted / estimate.tried
            self.prior += self.smoothing * (observed - self.prior)


def measure_batch_curve(target, max_rows: int, context: int = 32, repeats: int = 5) -> CostCurve:
    """``c(rows)`` for rows ``1, 2, 4, ...`` up to at least ``max_rows`` on a short cache, measured with
    :meth:`CostCurve.measure`. Linear layers dominate at these sizes, so ``rows`` rows in one sequence cost
    about what ``rows`` rows spread over a batch cost. A few forwards, run once at startup."""
    rows = [1]
    while rows[-1] < max_rows:
        rows.append(min(rows[-1] * 2, max_rows))
    rows = [r for r in rows if r + context + 1 <= target.max_context] or [1]
    if len(rows) == 1:
        return CostCurve((1, 2), (1.0, 2.0))
    return CostCurve.measure(target, rows=tuple(rows), context=context, rounds=repeats)
