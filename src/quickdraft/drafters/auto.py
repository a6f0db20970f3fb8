"""The ``auto`` drafter: several drafters merged into one draft tree, the budget split by what works.

Each step every **source** drafter proposes a tree; the trees are merged into one prefix tree (a token
path proposed by two sources becomes one node, credited to both). The budget is split among the sources
in proportion to their **value**, an exponential moving average of the accepted nodes they proposed; the
most valuable source fills its share first and whatever it leaves unused flows to the next. This is a
proportional bandit: a source that stops paying off for the current workload (prompt copying in
summarisation, recycled successors in open-ended chat) gets a smaller share, but never none, so it is
re-discovered when the workload changes. A user does not have to know which drafter suits their traffic.

Sources must be drafters that need no model of their own (default: ``suffix`` and ``recycle``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quickdraft.drafters import create_drafter, register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.types import DraftTree

#: Smallest share of the budget any source keeps, so that it can prove itself again.
MIN_SHARE = 0.15


@dataclass
class MergedTree:
    """A merged draft tree and, for each of its nodes, the indices of the sources that proposed it."""

    tree: DraftTree
    origins: list[set[int]]


def merge_trees(trees: list[DraftTree], quotas: list[int]) -> MergedTree:
    """Merge ``trees`` in order; source ``s`` may add at most ``quotas[s]`` new nodes (nodes it shares with
    an earlier source cost nothing)."""
    tokens: list[int] = []
    parents: list[int] = []
    origins: list[set[int]] = []
    index: dict[tuple[int, int], int] = {}
    for source, (tree, quota) in enumerate(zip(trees, quotas)):
        mapping: dict[int, int] = {}
        added = 0
        for node, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            merged_parent = -1 if parent < 0 else mapping.get(parent)
            if merged_parent is None:
                continue
            key = (merged_parent, token)
            if key not in index:
                if added >= quota:
                    continue
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
                origins.append(set())
                added += 1
            mapping[node] = index[key]
            origins[index[key]].add(source)
    merged = DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    return MergedTree(merged, origins)


@register("auto")
class AutoDrafter(Drafter):
    """Options: ``sources`` (comma-separated drafter names, default ``suffix,recycle``), ``smoothing``
    (moving-average weight of the newest step, default 0.1), ``datastore`` (forwarded to ``suffix``)."""

    def __init__(self, sources: list[Drafter], smoothing: float = 0.1) -> None:
        if not sources:
            raise ValueError("auto needs at least one source drafter")
        self.sources = sources
        self.smoothing = float(smoothing)
        self.value = [1.0] * len(sources)
        self.needs = frozenset().union(*(s.needs for s in sources))
        self.hidden_layers = tuple(sorted({layer for s in sources for layer in s.hidden_layers}))
        self._last: MergedTree | None = None

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> AutoDrafter:
        options = dict(setup.options)
        names = [n.strip() for n in str(options.pop("sources", "suffix,recycle")).split(",") if n.strip()]
        datastore = options.pop("datastore", None)
        sources = []
        for name in names:
            source_options = {"datastore": datastore} if name == "suffix" and datastore else {}
            sources.append(create_drafter(name, DrafterSetup(setup.target, setup.tokenizer, source_options)))
        return cls(sources, **options)

    def begin(self, ctx: DraftContext) -> None:
        for source in self.sources:
            source.begin(ctx)

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        order = sorted(range(len(self.sources)), key=lambda s: -self.value[s])
        quotas = self.quotas(budget)
        trees = [self.sources[s].propose(ctx, budget) for s in order]
        ordered_quotas = _flowing_quotas([quotas[s] for s in order], [t.size for t in trees], budget)
        merged = merge_trees(trees, ordered_quotas)
        merged.origins = [{order[s] for s in origin} for origin in merged.origins]
        self._last = merged
        return merged.tree

    def quotas(self, budget: int) -> list[int]:
        """Each source's share of ``budget``, proportional to its value with a floor of ``MIN_SHARE``."""
        total = sum(self.value)
        shares = [max(MIN_SHARE, v / total if total > 0 else 1 / len(self.value)) for v in self.value]
        norm = sum(shares)
        return [max(1, math.ceil(budget * share / norm)) for share in shares]

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        for source in self.sources:
            source.observe(ctx, outcome)
        if self._last is None or not self._last.origins:
            return
        accepted = [0] * len(self.sources)
        for node in outcome.result.accepted_nodes:
            for s in self._last.origins[node]:
                accepted[s] += 1
        for s in range(len(self.sources)):
            self.value[s] += self.smoothing * (accepted[s] - self.value[s])

    def end(self) -> None:
        for source in self.sources:
            source.end()
        self._last = None


def _flowing_quotas(quotas: list[int], sizes: list[int], budget: int) -> list[int]:
    """Quotas in priority order, where what a source cannot use flows to the next; total <= ``budget``."""
    result = []
    carry = 0
    remaining = budget
    for quota, size in zip(quotas, sizes):
        take = min(quota + carry, size, remaining)
        carry = quota + carry - take
        remaining -= take
        result.append(take)
    return result
