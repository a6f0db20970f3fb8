"""The ``auto`` drafter: several drafters, one draft tree, the budget given first to the one likely right.

Every step each **source** drafter reports its **evidence** (:meth:`~quickdraft.drafters.base.Drafter.evidence`:
a small integer for how strong its grounds are, such as the suffix drafter's match length; 0 when a drafter
does not say) and proposes a tree with the whole budget; ``auto``'s own evidence is the strongest of theirs.
After verification, every source's tree is scored against the tokens the target committed: its **coverage**
is how many of those tokens, from the first, lie on one path of the tree. Because this is measured for every
source, verified or not, each is judged every step and no exploration is needed. A source's **value** at an
evidence level is the moving average of its coverage at that level (until the level is seen, the source's
value over all levels); its **miss rate** there is the moving average of how often its coverage was 0 (its
tree did not even hold the first committed token).

The tree is filled in order of value: the most valuable source adds as many nodes as it proposed; the next
may use the share of what is left of the budget equal to the chance that every source ahead of it missed
(the product of their miss rates), and so on; a token path proposed by two sources becomes one node
(prefix-tree merge). So a long suffix match that is rarely wrong takes the tree alone and keeps it small,
and where there is no match the budget goes to the others. A user does not have to know which drafter
suits their traffic.

Sources must be drafters that need no model of their own (default: ``suffix`` and ``recycle``, and ``eagle``
where a shipped head fits the loaded model and reached :data:`MIN_HEAD_TAU` in training: its tree is merged
with the suffix drafter's under the one budget, as SAM-Decoding + EAGLE do). Merged trees carry no draft
probabilities: under sampling every node is a point mass, which is lossless for any tokens the drafters chose
before verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quickdraft.drafters import create_drafter, register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import QuickdraftError
from quickdraft.tree import coverage
from quickdraft.types import DraftTree

#: A source's value before any step has been observed (optimistic: worth trying first).
INITIAL_VALUE = 1.0
#: The held-out chain tau a shipped head must have reached in training for ``auto`` to draft with it by default
#: (a weaker head costs drafting time each step and rarely covers what the target commits).
MIN_HEAD_TAU = 1.5
#: A source's miss rate before any step has been observed (the sources after it may fill the budget).
INITIAL_MISS_RATE = 1.0


@dataclass
class Proposal:
    """One source's tree for the current step and the evidence level it reported."""

    tree: DraftTree
    evidence: int


def merge_trees(trees: list[DraftTree], budget: int, shares: list[float] | None = None) -> DraftTree:
    """Merge ``trees`` in order into one prefix tree of at most ``budget`` nodes; a node already added by
    an earlier tree costs nothing, and a node whose parent did not fit is dropped. ``shares[i]`` (default
    1.0) is the fraction of the budget still free when tree ``i`` comes that it may fill."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for tree, share in zip(trees, shares or [1.0] * len(trees)):
        limit = len(tokens) + round((budget - len(tokens)) * share)
        mapping: dict[int, int] = {}
        for node, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            merged_parent = -1 if parent < 0 else mapping.get(parent)
            if merged_parent is None:
                continue
            key = (merged_parent, token)
            if key not in index:
                if len(tokens) >= limit:
                    continue
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
            mapping[node] = index[key]
    return DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


def head_available(setup: DrafterSetup) -> bool:
    """Whether a shipped EAGLE head fits the loaded target, its sessions return hidden states, and the head's
    held-out chain tau reached :data:`MIN_HEAD_TAU` (then ``auto`` adds the ``eagle`` drafter to its default
    sources: SAM-Decoding + EAGLE)."""
    from quickdraft.heads.config import read_config, shipped_head
    from quickdraft.models.base import HIDDEN_STATES

    probe = setup.target.new_session(1)
    try:
        if HIDDEN_STATES not in probe.capabilities:
            return False
    finally:
        probe.close()
    try:
        folder = shipped_head("eagle", setup.target, setup.tokenizer)
    except QuickdraftError:
        return False
    measured = read_config(folder).trained.get("heldout_tau") or [0.0]
    return measured[-1] >= MIN_HEAD_TAU


@register("auto")
class AutoDrafter(Drafter):
    """Options: ``sources`` (comma-separated drafter names, default ``suffix,recycle``), ``smoothing``
    (moving-average weight of the newest step, default 0.1), ``datastore`` (forwarded to ``suffix``), ``head``
    (forwarded to ``eagle`` or ``medusa`` among the sources)."""

    option_names = frozenset({"sources", "smoothing", "datastore", "head"})

    def __init__(self, sources: list[Drafter], smoothing: float = 0.1) -> None:
        if not sources:
            raise ValueError("auto needs at least one source drafter")
        self.sources = sources
        self.smoothing = float(smoothing)
        self.overall = [INITIAL_VALUE] * len(sources)
        self.by_evidence: list[dict[int, float]] = [{} for _ in sources]
        self.overall_miss = [INITIAL_MISS_RATE] * len(sources)
        self.miss_by_evidence: list[dict[int, float]] = [{} for _ in sources]
        self.needs = frozenset().union(*(s.needs for s in sources))
        self.hidden_layers = tuple(sorted({layer for s in sources for layer in s.hidden_layers}))
        self._proposals: list[Proposal] = []

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> AutoDrafter:
        options = dict(setup.options)
        default = "suffix,recycle" + (",eagle" if head_available(setup) else "")
        names = [n.strip() for n in str(options.pop("sources", default)).split(",") if n.strip()]
        datastore, head = options.pop("datastore", None), options.pop("head", None)
        sources = []
        for name in names:
            source_options = {"datastore": datastore} if name == "suffix" and datastore else {}
            if name in ("eagle", "medusa") and head is not None:
                source_options = {"head": head}
            sources.append(create_drafter(name, DrafterSetup(setup.target, setup.tokenizer, source_options)))
        return cls(sources, **options)

    def begin(self, ctx: DraftContext) -> None:
        for source in self.sources:
            source.begin(ctx)

    def observe_prompt(self, ctx: DraftContext, hidden: dict[int, torch.Tensor]) -> None:
        for source in self.sources:
            if "hidden_states" in source.needs:
                source.observe_prompt(ctx, hidden)

    def evidence(self, ctx: DraftContext) -> int:
        return max(source.evidence(ctx) for source in self.sources)

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        self._proposals = []
        for source in self.sources:
            evidence = source.evidence(ctx)
            self._proposals.append(Proposal(source.propose(ctx, budget), evidence))
        order = sorted(range(len(self.sources)), key=lambda s: -self.value(s, self._proposals[s].evidence))
        shares, all_missed = [], 1.0
        for s in order:
            shares.append(all_missed)
            all_missed *= self.miss_rate(s, self._proposals[s].evidence)
        return merge_trees([self._proposals[s].tree for s in order], budget, shares)

    def value(self, source: int, evidence: int) -> float:
        """Expected coverage of ``source``'s tree when it reports ``evidence``."""
        return self.by_evidence[source].get(evidence, self.overall[source])

    def miss_rate(self, source: int, evidence: int) -> float:
        """How often ``source``'s tree missed the first committed token when it reported ``evidence``."""
        return self.miss_by_evidence[source].get(evidence, self.overall_miss[source])

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        for source in self.sources:
            source.observe(ctx, outcome)
        for s, proposal in enumerate(self._proposals):
            covered = coverage(proposal.tree, outcome.result.tokens)
            self._record(self.overall, self.by_evidence[s], s, proposal.evidence, covered)
            self._record(self.overall_miss, self.miss_by_evidence[s], s, proposal.evidence, float(covered == 0))
        self._proposals = []

    def _record(self, overall: list[float], by_evidence: dict[int, float], source: int, evidence: int,
                newest: float) -> None:
        """Fold ``newest`` into ``source``'s moving average over all levels and at ``evidence``."""
        overall[source] = self._averaged(overall[source], newest)
        previous = by_evidence.get(evidence)
        by_evidence[evidence] = newest if previous is None else self._averaged(previous, newest)

    def _averaged(self, previous: float, newest: float) -> float:
        return previous + self.smoothing * (newest - previous)

    def end(self) -> None:
        for source in self.sources:
            source.end()
        self._proposals = []
