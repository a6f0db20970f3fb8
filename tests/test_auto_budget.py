"""The auto drafter's tree merging and budget split, and the hardware-fit budget policy."""

import torch

from quickdraft.budget import BudgetPolicy, CostCurve
from quickdraft.drafters.auto import AutoDrafter, _flowing_quotas, merge_trees
from quickdraft.drafters.base import DraftContext, Drafter, StepOutcome
from quickdraft.types import DraftTree, SamplingParams, VerifyResult


def test_merge_shares_common_prefixes_and_credits_both_sources():
    a = DraftTree.from_paths([[1, 2, 3]])
    b = DraftTree.from_paths([[1, 2, 4], [5]])
    merged = merge_trees([a, b], [3, 3])
    assert merged.tree.tokens.tolist() == [1, 2, 3, 4, 5]
    assert merged.tree.parents.tolist() == [-1, 0, 1, 1, -1]
    assert merged.origins == [{0, 1}, {0, 1}, {0}, {1}, {1}]


def test_merge_respects_quotas_and_drops_orphans():
    a = DraftTree.from_paths([[1, 2, 3]])
    b = DraftTree.from_paths([[7, 8, 9]])
    merged = merge_trees([a, b], [2, 1])
    assert merged.tree.tokens.tolist() == [1, 2, 7]
    assert merged.tree.parents.tolist() == [-1, 0, -1]


def test_unused_quota_flows_to_the_next_source():
    assert _flowing_quotas([6, 2], [1, 10], 8) == [1, 7]
    assert _flowing_quotas([6, 2], [10, 10], 8) == [6, 2]


class Fixed(Drafter):
    def __init__(self, paths):
        self.paths = paths

    def propose(self, ctx, budget):
        return DraftTree.from_paths(self.paths).truncated(budget)


def test_auto_shifts_budget_towards_the_source_that_gets_accepted():
    good, bad = Fixed([[1, 2, 3, 4]]), Fixed([[9, 9, 9, 9]])
    auto = AutoDrafter([bad, good])
    ctx = DraftContext([0], 1, SamplingParams())
    for _ in range(30):
        tree = auto.propose(ctx, 4)
        accepted = [i for i, t in enumerate(tree.tokens.tolist()) if t in (1, 2, 3, 4)]
        accepted = [n for n in accepted if tree.parents[n] < 0 or tree.parents[n] in accepted]
        auto.observe(ctx, StepOutcome(tree, VerifyResult(accepted, [0] * (len(accepted) + 1), tree.size)))
    quotas = auto.quotas(10)
    assert quotas[1] > quotas[0] >= 1
    assert auto.propose(ctx, 4).tokens.tolist()[:3] == [1, 2, 3]


def test_cost_curve_interpolates():
    curve = CostCurve((1, 8, 32), (1.0, 1.2, 3.0))
    assert curve(1) == 1.0 and abs(curve(20) - 2.1) < 1e-9


def test_policy_prefers_big_trees_when_verification_is_free_and_small_when_it_is_not():
    cheap, costly = BudgetPolicy(CostCurve.flat(), explore=0), BudgetPolicy(CostCurve((1, 65), (1.0, 65.0)), explore=0)
    for policy in (cheap, costly):
        for budget in policy.ladder:
            policy.update(budget, min(budget, 3) * 0.8)
    assert cheap.choose() >= 4
    assert costly.choose() == 1
    assert costly.choose(limit=0) == 1 or costly.choose(limit=0) == min(costly.ladder)


def test_policy_learns_from_observed_acceptance():
    policy = BudgetPolicy(CostCurve((1, 9, 17, 65), (1.0, 1.1, 1.5, 4.0)), explore=0)
    for _ in range(20):
        policy.update(8, 0.0)  # drafts never accepted at 8
        policy.update(1, 0.0)
    assert policy.choose() in (1, 2)
