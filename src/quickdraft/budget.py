"""How many draft nodes to verify per step, chosen to fit the hardware.

Verifying ``n`` draft nodes costs one target forward over ``n + 1`` rows, whose time relative to a 1-row
forward is the **verification cost curve** ``c(n + 1)`` (``quickdraft profile`` prints it). A step then
commits ``1 + a(n)`` tokens on average, where ``a(n)`` is the drafter's mean accepted length when given
``n`` nodes. The policy picks the budget that maximises committed tokens per unit of time,

    n* = argmax_n (1 + a(n)) / c(n + 1),

estimating ``a(n)`` online for a ladder of budgets. The estimate is a **discounted mean**: every step, the
weight of all earlier observations of every budget is multiplied by ``discount``, so the estimate follows the
text as it changes (a copied passage, then free prose), shrunk toward what the other budgets suggest (see
:meth:`BudgetPolicy.expected_accepted`). The budget chosen is the one with the best score when
each mean is raised by an optimism bonus ``exploration * sqrt(log(W) / w(n))``, where ``w(n)`` is the
discounted weight of budget ``n``'s observations and ``W`` their sum over all budgets (discounted UCB,
Garivier and Moulines 2011). A budget that did badly early in a reply is thus tried again once its weight has
decayed, instead of being written off for the rest of the reply. The policy is deterministic: a request
reproduces exactly.

A step also tells what smaller budgets would have done (**counterfactual acceptance**): the verified tree cut
to its first ``n`` nodes is what the drafter proposes with ``n`` nodes when it lists its best nodes first (a
chain, a breadth-first tree), and the accepted nodes that lie in that cut (a node's parent comes before it, so
these are the first accepted nodes) are the draft tokens it would have had accepted. Every ladder budget up to
the one verified is therefore updated every step, so a large budget, once tried, informs all smaller ones. The
cut is an approximation for a drafter that shapes a small tree differently (the suffix drafter gives side
branches a larger share of a small budget), and under sampling the accepted nodes in the cut estimate, rather
than replay, its rejection sampling. A budget larger than any tried gets its guess (below) plus the optimism
bonus of a budget observed once, so it is tried where the cost curve makes it worth it.

Acceptance depends strongly on the drafter's **evidence** for the step (see
:meth:`~quickdraft.drafters.base.Drafter.evidence`; for the suffix drafter, the match length): a 1-token match
rarely survives two nodes, an 8-token match into a copied passage often survives sixteen. An
:class:`EvidenceBudget` keeps one policy per evidence level, so a strong match gets a long draft at once
instead of waiting for the average over weak ones to rise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from quickdraft.devices import synchronize
from quickdraft.models.base import TargetModel
from quickdraft.types import DraftTree

#: Budgets whose verification rows (budget + 1: the root and the nodes) are the rows the cost curve measures
#: (2, 4, 8, 16, 32, 65) or lie halfway between them. CPU kernels work in row blocks (PyTorch's int4 kernel 4
#: rows at a time, AMX tiles 16): a forward over 5 rows costs what one over 8 does, not the 1.5x a line between
#: the measured 4 and 8 would suggest, so a budget of 4 is a poor buy and 3 a good one.
DEFAULT_LADDER = (1, 3, 7, 11, 15, 23, 31, 47, 64)
#: The weight of a budget's guess in its estimate, in observations (see :meth:`BudgetPolicy.expected_accepted`).
PRIOR_WEIGHT = 1.0
#: Per-node acceptance rate assumed before any observation: optimistic, so the first step at an evidence level
#: verifies a large tree (as large as the cost curve makes worth it), whose cuts then inform every smaller budget.
PRIOR_RATE = 0.8


@dataclass(frozen=True)
class CostCurve:
    """``c(rows)``: time of a forward over ``rows`` new rows divided by the time over one row."""

    rows: tuple[int, ...]
    relative_cost: tuple[float, ...]

    def __call__(self, rows: float, extrapolate: bool = False) -> float:
        """``c(rows)``: linear between measured points; below the first, its cost; beyond the last, its cost,
        or with ``extrapolate`` the last segment continued (never downward)."""
        last = self.rows[-1]
        if extrapolate and rows > last and len(self.rows) > 1:
            slope = (self.relative_cost[-1] - self.relative_cost[-2]) / (last - self.rows[-2])
            return self.relative_cost[-1] + max(slope, 0.0) * (rows - last)
        return float(np.interp(rows, self.rows, self.relative_cost))

    def to_json(self) -> str:
        """The curve as JSON, read back by :meth:`from_json`."""
        return json.dumps({"rows": list(self.rows), "relative_cost": list(self.relative_cost)})

    @classmethod
    def from_json(cls, text: str) -> CostCurve:
        """A curve written by :meth:`to_json`; ValueError if ``text`` is not one."""
        data = json.loads(text)
        rows, costs = tuple(int(r) for r in data["rows"]), tuple(float(c) for c in data["relative_cost"])
        if not rows or len(rows) != len(costs):
            raise ValueError(f"not a cost curve: {text[:200]!r}")
        return cls(rows, costs)

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
                synchronize(target.device)
                best[index] = min(best[index], time.perf_counter() - start)
                session.truncate(context)
        session.close()
        relative = np.maximum.accumulate(np.array(best) / best[0])
        return cls(tuple(rows), tuple(float(c) for c in relative))


class BudgetPolicy:
    """Chooses the number of draft nodes per step (see the module docstring)."""

    def __init__(self, curve: CostCurve, max_budget: int = 64, ladder: Sequence[int] = DEFAULT_LADDER,
                 discount: float = 0.9, exploration: float = 0.5) -> None:
        self.curve = curve
        self.ladder = [n for n in ladder if n <= max_budget] or [max_budget]
        self.discount = discount
        self.exploration = exploration
        self.weight: dict[int, float] = {}
        self.accepted_sum: dict[int, float] = {}

    def choose(self, limit: int | None = None) -> int:
        """The budget for the next step, at most ``limit``: the best score when each estimate is raised by
        its optimism bonus."""
        arms = [n for n in self.ladder if limit is None or n <= limit] or [min(self.ladder)]
        estimates = self.estimates()
        total = sum(self.weight.values())

        def optimistic_score(budget: int) -> float:
            return (1.0 + estimates[budget] + self.bonus(budget, total)) / self.curve(budget + 1)

        return max(arms, key=optimistic_score)

    def bonus(self, budget: int, total: float) -> float:
        """The exploration bonus given ``total``, the summed weight of all observations: large for a budget
        whose observations are few or old (an untried budget counts as observed once); 0 before any."""
        if not total:
            return 0.0
        weight = self.weight.get(budget) or 1.0
        return self.exploration * math.sqrt(max(math.log(total), 1.0) / weight)

    def expected_accepted(self, budget: int) -> float:
        """The discounted mean for ``budget`` (a ladder budget), shrunk toward :meth:`guess` as if the guess
        had been observed with weight ``PRIOR_WEIGHT``: a budget with many recent observations follows them, and
        one whose observations are few or old follows what the other budgets now show."""
        return self.estimates()[budget]

    def guess(self, budget: int) -> float:
        """What the other budgets suggest for ``budget`` (see :meth:`_guess`)."""
        return self._guess(budget, self.estimates())

    def estimates(self) -> dict[int, float]:
        """:meth:`expected_accepted` of every ladder budget, computed once: tried budgets from the smallest
        (each guess needs only smaller tried ones), then untried budgets."""
        known: dict[int, float] = {}
        for budget in sorted(self.weight) + [n for n in self.ladder if n not in self.weight]:
            guess = self._guess(budget, known)
            weight = self.weight.get(budget, 0.0)
            known[budget] = (self.accepted_sum.get(budget, 0.0) + PRIOR_WEIGHT * guess) / (weight + PRIOR_WEIGHT)
        return known

    def _guess(self, budget: int, known: dict[int, float]) -> float:
        """From the nearest smaller tried budget, the per-node acceptance rate that explains its estimate on a
        chain (:func:`chain_rate`) carried to ``budget`` nodes; else, for an untried budget, the nearest
        larger tried budget's estimate; else, before any observation, a chain accepted at ``PRIOR_RATE`` per
        node. ``known`` holds the estimates of the tried budgets this needs."""
        below = [n for n in self.weight if n < budget]
        if below:
            nearest = max(below)
            return chain_accepted(chain_rate(known[nearest], nearest), budget)
        above = [n for n in self.weight if n > budget]
        if above and budget not in self.weight:
            return known[min(above)]
        return chain_accepted(PRIOR_RATE, budget)

    def update(self, budget: int, accepted: float) -> None:
        """Record that a step with ``budget`` nodes had ``accepted`` draft tokens accepted."""
        self.record({budget: accepted})

    def observe(self, accepted_nodes: Sequence[int], budget: int) -> None:
        """Record a verified step of ``budget`` nodes that accepted ``accepted_nodes`` (the tree's nodes on the
        accepted path, root first) and its counterfactual acceptance at every smaller ladder budget."""
        self.record(counterfactual_accepted(accepted_nodes, budget, self.ladder))

    def record(self, accepted_by_budget: Mapping[int, float]) -> None:
        """Record one step: ``accepted_by_budget[n]`` draft tokens were (or would have been) accepted with
        ``n`` nodes. Budgets off the ladder are ignored; all earlier observations are discounted once."""
        arms = {n: a for n, a in accepted_by_budget.items() if n in self.ladder}
        if not arms:
            return
        for arm in self.weight:
            self.weight[arm] *= self.discount
            self.accepted_sum[arm] *= self.discount
        for arm, accepted in arms.items():
            self.weight[arm] = self.weight.get(arm, 0.0) + 1.0
            self.accepted_sum[arm] = self.accepted_sum.get(arm, 0.0) + accepted


class EvidenceBudget:
    """One :class:`BudgetPolicy` per evidence level, each made by ``make_policy`` when its level first comes."""

    def __init__(self, make_policy: Callable[[], BudgetPolicy]) -> None:
        self.make_policy = make_policy
        self.by_evidence: dict[int, BudgetPolicy] = {}

    def policy(self, evidence: int) -> BudgetPolicy:
        if evidence not in self.by_evidence:
            self.by_evidence[evidence] = self.make_policy()
        return self.by_evidence[evidence]

    def choose(self, evidence: int, limit: int | None = None) -> int:
        """The budget for a step whose drafter reports ``evidence``, at most ``limit``."""
        return self.policy(evidence).choose(limit)

    def update(self, evidence: int, budget: int, accepted: int) -> None:
        """Record a step's outcome under the evidence level its drafter reported."""
        self.policy(evidence).update(budget, accepted)

    def observe(self, evidence: int, accepted_nodes: Sequence[int], budget: int) -> None:
        """Record a verified step and its counterfactual acceptance under the evidence level reported."""
        self.policy(evidence).observe(accepted_nodes, budget)


def counterfactual_accepted(accepted_nodes: Sequence[int], budget: int, ladder: Sequence[int]) -> dict[int, int]:
    """Draft tokens accepted with each ladder budget up to ``budget`` in a step that verified ``budget`` nodes
    and accepted ``accepted_nodes``: those of them in the tree cut to that many nodes (see the module
    docstring)."""
    return {n: sum(node < n for node in accepted_nodes) for n in ladder if n <= budget}


def chain_accepted(rate: float, nodes: int) -> float:
    """Mean accepted length of a ``nodes``-token chain whose every token is accepted with probability
    ``rate`` given that the one before it was: ``rate + rate^2 + ... + rate^nodes``."""
    if nodes <= 0 or rate <= 0:
        return 0.0
    if rate >= 1:
        return float(nodes)
    return rate * (1 - rate**nodes) / (1 - rate)


def chain_rate(accepted: float, nodes: int) -> float:
    """The per-token rate at which a ``nodes``-token chain accepts ``accepted`` tokens on average (the
    inverse of :func:`chain_accepted`, found by bisection)."""
    if accepted >= nodes:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if chain_accepted(middle, nodes) < accepted else (low, middle)
    return (low + high) / 2
