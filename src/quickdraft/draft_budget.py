"""The one budget interface: ``choose(sequences) -> budgets``, the draft nodes each sequence may verify in the
next :func:`~quickdraft.decoding.step`.

- :class:`FixedBudget`: the same number every step (``--draft-budget N``; 0 for plain decoding).
- :class:`RequestBudget`, the **single-request policy** (the engine's default): per request and per evidence
  level of its drafter, the budget that maximises committed tokens per unit of forward time on the measured
  cost curve (:class:`~quickdraft.budget.EvidenceBudget` of :class:`~quickdraft.budget.BudgetPolicy`).
- :class:`LoadAdaptiveBudget`, the **batch policy** (the server's): one budget for the whole batch from
  :class:`~quickdraft.batch_budget.BatchBudgetPolicy`, shrinking to 0 as the batch grows if the cost curve says
  speculation no longer pays; young sequences are still probed with a small budget now and then, so their
  acceptance keeps being learned. A batch of one is the single-request policy's choice.

Both adaptive policies read each drafter's **evidence** for the step (see
:meth:`~quickdraft.drafters.base.Drafter.evidence`) and learn from each sequence's :class:`RequestEstimate`,
which the step updates after verification.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from quickdraft.batch_budget import AcceptanceEstimate, BatchBudgetPolicy
from quickdraft.budget import BudgetPolicy, CostCurve, EvidenceBudget
from quickdraft.types import DraftTree, VerifyResult

if TYPE_CHECKING:
    from quickdraft.decoding import Sequence

#: Largest number of draft nodes the single-request policy may verify in one step.
MAX_ADAPTIVE_BUDGET = 64
#: Default largest draft budget per sequence in a batch.
DEFAULT_MAX_DRAFT = 16
#: When the batch policy says "do not speculate", every PROBE_EVERY-th step still drafts PROBE_BUDGET tokens
#: for sequences that have tried fewer than PROBE_UNTIL draft tokens: cheap exploration.
PROBE_EVERY = 8
PROBE_BUDGET = 2
PROBE_UNTIL = 6


class RequestEstimate:
    """What one request's steps showed about its drafter.

    ``evidence``: the drafter's evidence for the coming step (read by a policy's ``choose``, 0 if none read);
    ``ladders``: the single-request policy's estimates per evidence level, made on first use;
    ``acceptance``: accepted and tried draft nodes over the request, and ``by_evidence`` per evidence level
    (:class:`~quickdraft.batch_budget.AcceptanceEstimate`), for the batch policy."""

    def __init__(self) -> None:
        self.evidence = 0
        self.ladders: EvidenceBudget | None = None
        self.acceptance = AcceptanceEstimate()
        self.by_evidence: dict[int, AcceptanceEstimate] = {}

    def ladders_for(self, make: Callable[[], EvidenceBudget]) -> EvidenceBudget:
        if self.ladders is None:
            self.ladders = make()
        return self.ladders

    def observe(self, tree: DraftTree, result: VerifyResult, budget: int) -> None:
        """Record a verified step that was given ``budget`` nodes and drafted ``tree``."""
        if not tree.size:
            return
        if self.ladders is not None:
            self.ladders.observe(self.evidence, result.accepted_nodes, budget)
        self.acceptance.update(tree.size, result.num_accepted)
        self.by_evidence.setdefault(self.evidence, AcceptanceEstimate()).update(tree.size, result.num_accepted)


class DraftBudget(ABC):
    """Chooses the draft budget of every sequence for the next step. ``max_budget``: the most it ever gives
    one sequence (it sizes the KV caches)."""

    max_budget: int = 0

    @abstractmethod
    def choose(self, sequences: list[Sequence]) -> list[int]:
        """One budget per sequence (:func:`~quickdraft.decoding.step` caps each at the sequence's room)."""

    def finished(self, sequence: Sequence) -> None:
        """A sequence ended normally (the batch policy learns its prior from it)."""


class FixedBudget(DraftBudget):
    """``budget`` nodes for every sequence that has a drafter, every step."""

    def __init__(self, budget: int) -> None:
        self.max_budget = budget

    def choose(self, sequences: list[Sequence]) -> list[int]:
        return [self.max_budget if s.drafter is not None else 0 for s in sequences]


class RequestBudget(DraftBudget):
    """The single-request policy (see the module docstring), fitted to ``curve``."""

    def __init__(self, curve: CostCurve, max_budget: int = MAX_ADAPTIVE_BUDGET) -> None:
        self.curve = curve
        self.max_budget = max_budget

    def new_ladders(self) -> EvidenceBudget:
        """A request's estimates; each request starts from the same state, so a seeded request reproduces."""
        return EvidenceBudget(lambda: BudgetPolicy(self.curve, max_budget=self.max_budget))

    def choose(self, sequences: list[Sequence]) -> list[int]:
        return [self.choose_one(s) for s in sequences]

    def choose_one(self, sequence: Sequence) -> int:
        evidence = sequence.read_evidence()
        if sequence.drafter is None or sequence.room <= 0:
            return 0
        return sequence.estimate.ladders_for(self.new_ladders).choose(evidence, limit=sequence.room)


class LoadAdaptiveBudget(DraftBudget):
    """The batch policy (see the module docstring), fitted to ``curve`` (``c(rows)`` of batched forwards)."""

    def __init__(self, curve: CostCurve, max_budget: int = DEFAULT_MAX_DRAFT) -> None:
        self.batch = BatchBudgetPolicy(curve, max_budget=max_budget)
        self.single = RequestBudget(curve, max_budget)
        self.max_budget = max_budget
        self.steps = 0

    def choose(self, sequences: list[Sequence]) -> list[int]:
        self.steps += 1
        for sequence in sequences:  # every step teaches the ladders, used when a sequence is alone
            sequence.estimate.ladders_for(self.single.new_ladders)
        if len(sequences) == 1:
            return self.single.choose(sequences)
        for sequence in sequences:
            sequence.read_evidence()
        drafting = [s for s in sequences if s.drafter is not None]
        rates = [self.rate(s) for s in drafting]
        budget = self.batch.choose(rates, [s.room for s in drafting]) if drafting else 0
        if budget == 0 and self.steps % PROBE_EVERY == 0:
            return [min(PROBE_BUDGET, self.max_budget) if s.drafter is not None
                    and s.estimate.acceptance.tried < PROBE_UNTIL else 0 for s in sequences]
        return [budget] * len(sequences)

    def rate(self, sequence: Sequence) -> float:
        """The sequence's per-node acceptance rate at its drafter's current evidence level, smoothed toward
        its rate over all levels, itself smoothed toward the prior of finished sequences."""
        overall = self.batch.rate(sequence.estimate.acceptance)
        level = sequence.estimate.by_evidence.get(sequence.estimate.evidence)
        return level.rate(overall, self.batch.prior_weight) if level is not None else overall

    def finished(self, sequence: Sequence) -> None:
        self.batch.finished(sequence.estimate.acceptance)
