"""The auto drafter's tree merging and source ranking, and the hardware-fit budget policy."""

import inspect

import pytest

from quickdraft.budget import (
    BudgetPolicy,
    CostCurve,
    EvidenceBudget,
    chain_accepted,
    chain_rate,
    counterfactual_accepted,
)
from quickdraft.drafters.auto import AutoDrafter, merge_trees
from quickdraft.drafters.base import DraftContext, Drafter, StepOutcome
from quickdraft.tree import coverage, matched_path
from quickdraft.types import DraftTree, SamplingParams, VerifyResult

#: A ladder for the tests of the policy's mechanics, which do not depend on which budgets the ladder holds.
LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def test_merge_shares_common_prefixes():
    a = DraftTree.from_paths([[1, 2, 3]])
    b = DraftTree.from_paths([[1, 2, 4], [5]])
    merged = merge_trees([a, b], 10)
    assert merged.tokens.tolist() == [1, 2, 3, 4, 5]
    assert merged.parents.tolist() == [-1, 0, 1, 1, -1]


def test_merge_fills_the_budget_in_order_and_shared_nodes_cost_nothing():
    a = DraftTree.from_paths([[1, 2, 3]])
    b = DraftTree.from_paths([[1, 2, 5], [7, 8, 9]])
    merged = merge_trees([a, b], 5)
    assert merged.tokens.tolist() == [1, 2, 3, 5, 7]
    assert merged.parents.tolist() == [-1, 0, 1, 1, -1]
    assert merge_trees([b, a], 2).tokens.tolist() == [1, 2]


def test_coverage_counts_committed_tokens_on_one_path():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4]])
    assert coverage(tree, [1, 4, 9]) == 2
    assert coverage(tree, [1, 2, 3, 7]) == 3
    assert coverage(tree, [5, 1]) == 0
    assert coverage(DraftTree.empty(), [1]) == 0


class Fixed(Drafter):
    """Proposes fixed paths; ``level`` is the evidence it reports."""

    def __init__(self, paths, level=0):
        self.paths, self.level = paths, level

    def propose(self, ctx, budget):
        return DraftTree.from_paths(self.paths).truncated(budget)

    def evidence(self, ctx):
        return self.level


def _verify_greedy(auto, truth, budget):
    """One step of ``auto`` against a target whose greedy continuation is ``truth``; the accepted nodes."""
    ctx = DraftContext([0], 1, SamplingParams())
    tree = auto.propose(ctx, budget)
    children = {(p, t): n for n, (t, p) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist()))}
    accepted, node = [], -1
    for token in truth:
        node = children.get((node, token))
        if node is None:
            break
        accepted.append(node)
    auto.observe(ctx, StepOutcome(tree, VerifyResult(accepted, truth[: len(accepted) + 1], tree.size)))
    return tree


def test_auto_gives_the_whole_tree_to_the_source_that_covers_the_target():
    good, bad = Fixed([[1, 2, 3, 4]]), Fixed([[9, 9, 9, 9]])
    auto = AutoDrafter([bad, good])
    for _ in range(30):
        _verify_greedy(auto, [1, 2, 3, 4, 5], 4)
    assert auto.value(1, 0) > 3 and auto.value(0, 0) < 0.5
    assert _verify_greedy(auto, [1, 2, 3, 4, 5], 4).tokens.tolist() == [1, 2, 3, 4]
    assert _verify_greedy(auto, [1, 2, 3, 4, 5], 6).tokens.tolist() == [1, 2, 3, 4]


def test_auto_gives_what_the_leader_leaves_to_the_next_source_as_often_as_the_leader_misses():
    leader, backup = Fixed([[1, 2]]), Fixed([[5, 6, 7, 8, 9]])
    auto = AutoDrafter([leader, backup], smoothing=0.05)
    for step in range(200):
        _verify_greedy(auto, [1, 2, 3] if step % 2 else [5, 0, 0], 2)
    assert auto.miss_rate(0, 0) == pytest.approx(0.5, abs=0.05)
    assert auto.value(0, 0) > auto.value(1, 0)
    merged = merge_trees([leader.propose(None, 6), backup.propose(None, 6)], 6, [1.0, 0.5])
    assert merged.tokens.tolist() == [1, 2, 5, 6]
    assert _verify_greedy(auto, [1, 2, 3], 6).tokens.tolist() == [1, 2, 5, 6]


def test_auto_judges_a_source_separately_per_evidence_level():
    contextual, steady = Fixed([[1, 2, 3]]), Fixed([[1, 7]])
    auto = AutoDrafter([steady, contextual])
    for _ in range(20):
        contextual.level = 2
        _verify_greedy(auto, [1, 2, 3, 4], 2)
        contextual.level = 1
        _verify_greedy(auto, [1, 7, 8], 2)
    assert auto.value(1, 2) > auto.value(0, 0) > auto.value(1, 1)
    contextual.level = 2
    assert _verify_greedy(auto, [1, 2, 3, 4], 2).tokens.tolist() == [1, 2]
    contextual.level = 1
    assert _verify_greedy(auto, [1, 7, 8], 2).tokens.tolist() == [1, 7]


def test_cost_curve_interpolates():
    curve = CostCurve((1, 8, 32), (1.0, 1.2, 3.0))
    assert curve(1) == 1.0 and abs(curve(20) - 2.1) < 1e-9
    assert curve(0) == 1.0 and curve(64) == 3.0  # the end values beyond the measured points
    assert curve(64, extrapolate=True) == pytest.approx(3.0 + 1.8 / 24 * 32)  # the last segment continued
    assert curve(0, extrapolate=True) == 1.0
    falling = CostCurve((1, 2, 4), (1.0, 1.5, 1.4))
    assert falling(8, extrapolate=True) == 1.4  # never downward
    assert CostCurve((1,), (1.0,))(8, extrapolate=True) == 1.0


def test_policy_prefers_big_trees_when_verification_is_free_and_small_when_it_is_not():
    cheap, costly = BudgetPolicy(CostCurve.flat()), BudgetPolicy(CostCurve((1, 65), (1.0, 65.0)))
    for policy in (cheap, costly):
        for budget in policy.ladder:
            policy.update(budget, min(budget, 3) * 0.8)
    assert cheap.choose() >= 4
    assert costly.choose() == 1
    assert costly.choose(limit=0) == 1 or costly.choose(limit=0) == min(costly.ladder)


def test_policy_learns_from_observed_acceptance():
    policy = BudgetPolicy(CostCurve((1, 9, 17, 65), (1.0, 1.1, 1.5, 4.0)))
    for _ in range(20):
        policy.update(7, 0.0)  # drafts never accepted at 7
        policy.update(1, 0.0)
    assert policy.choose() in (1, 3)


def test_policy_retries_a_budget_that_failed_early_in_the_reply():
    """The start of a reply is hard to draft; once drafts start landing, larger budgets are tried again."""
    policy = BudgetPolicy(CostCurve((1, 2, 3, 5, 9, 17, 65), (1.0, 1.01, 1.23, 1.07, 1.48, 2.13, 6.0)))
    for budget in (1, 3, 7):
        policy.update(budget, 0)
    chosen = []
    for _ in range(60):
        budget = policy.choose()
        chosen.append(budget)
        policy.update(budget, budget)  # a copied passage: every draft token is accepted
    assert max(chosen[-10:]) >= 7
    assert policy.choose() == policy.choose()  # deterministic


def test_policy_carries_a_chain_acceptance_rate_to_untried_budgets():
    policy = BudgetPolicy(CostCurve.flat(), ladder=LADDER)
    for _ in range(200):
        policy.update(4, chain_accepted(0.9, 4))
    assert policy.expected_accepted(4) == pytest.approx(chain_accepted(0.9, 4), rel=0.05)
    carried = chain_accepted(chain_rate(policy.expected_accepted(4), 4), 16)
    assert policy.expected_accepted(16) == pytest.approx(carried, rel=1e-6)
    assert carried > policy.expected_accepted(4) + 2
    assert chain_rate(chain_accepted(0.3, 5), 5) == pytest.approx(0.3, abs=1e-6)
    assert chain_rate(5, 5) == 1.0


def test_evidence_budget_gives_strong_evidence_long_drafts_while_weak_evidence_keeps_short_ones():
    curve = CostCurve((1, 5, 9, 17, 65), (1.0, 1.05, 1.4, 2.0, 6.0))
    budget = EvidenceBudget(lambda: BudgetPolicy(curve, ladder=LADDER))
    for _ in range(30):
        budget.update(1, budget.choose(1), 0)
        strong = budget.choose(8)
        budget.update(8, strong, strong)
    assert budget.choose(8) >= 16
    assert budget.choose(1) <= 2
    assert BudgetPolicy(curve, ladder=LADDER).choose() == budget.choose(3)


def test_matched_path_lists_the_nodes_the_committed_tokens_followed():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4], [5]])
    assert matched_path(tree, [1, 4, 9]) == [0, 3]
    assert matched_path(tree, [1, 2, 3, 7]) == [0, 1, 2]
    assert matched_path(tree, [6]) == []


def test_counterfactual_acceptance_cuts_the_verified_tree_at_each_smaller_budget():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4, 5]])  # nodes: 1, 2, 3, 4, 5 (4 under 1, 5 under 4)
    ladder = (1, 2, 4, 8, 16)
    assert counterfactual_accepted(matched_path(tree, [1, 4, 5, 9]), 8, ladder) == {1: 1, 2: 1, 4: 2, 8: 3}
    assert counterfactual_accepted(matched_path(tree, [1, 2, 3, 7]), 4, ladder) == {1: 1, 2: 2, 4: 3}
    assert counterfactual_accepted(matched_path(tree, [8]), 16, ladder) == {1: 0, 2: 0, 4: 0, 8: 0, 16: 0}


def test_one_large_step_informs_every_smaller_budget():
    policy = BudgetPolicy(CostCurve.flat(), ladder=LADDER)
    chain = DraftTree.chain(list(range(10, 74)))
    policy.observe(matched_path(chain, list(range(10, 30)) + [99]), 64)
    assert set(policy.weight) == set(policy.ladder)
    pairs = [(1, 2), (8, 16), (16, 24)]
    assert [policy.expected_accepted(n) > policy.expected_accepted(m) for m, n in pairs] == [True] * len(pairs)
    assert policy.accepted_sum[16] == 16 and policy.accepted_sum[24] == 20


def test_a_stale_failed_budget_follows_what_smaller_budgets_now_show():
    policy = BudgetPolicy(CostCurve.flat(), discount=0.9, ladder=LADDER)
    policy.update(8, 0)
    assert policy.expected_accepted(8) < policy.guess(8) / 2 + 1e-9  # the failure halves the prior guess
    for _ in range(30):
        policy.update(4, 4)  # every draft accepted at 4 nodes since
    assert policy.expected_accepted(8) > 5


def test_ladder_budgets_verify_the_row_counts_the_cost_curve_measures_or_halfway_between():
    """Kernels work in row blocks, so a budget one past a block (4 nodes: 5 rows) costs a whole block more."""
    from quickdraft.budget import DEFAULT_LADDER

    measured = inspect.signature(CostCurve.measure).parameters["rows"].default
    halfway = {(a + b) // 2 for a, b in zip(measured, measured[1:])}
    assert [n for n in DEFAULT_LADDER if n + 1 not in set(measured) | halfway] == []
