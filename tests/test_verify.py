"""Verification: greedy acceptance, and the statistical proof that rejection sampling keeps the target
distribution (chains and trees, point-mass and probabilistic drafts, with sampling filters)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from quickdraft.sampling import probabilities
from quickdraft.types import DraftTree, SamplingParams
from quickdraft.verify import verify_greedy, verify_sampling, verify_typical_lossy

V = 4


def one_hot_logits(rows: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(rows), vocab)
    for r, token in enumerate(rows):
        logits[r, token] = 5.0
    return logits


def test_greedy_accepts_the_matching_prefix_and_adds_the_bonus():
    tree = DraftTree.chain([3, 4, 5])
    result = verify_greedy(tree, one_hot_logits([3, 4, 7, 1]))
    assert result.accepted_nodes == [0, 1]
    assert result.tokens == [3, 4, 7]
    assert result.bonus_token == 7 and result.num_drafted == 3


def test_greedy_walks_the_matching_branch_of_a_tree():
    tree = DraftTree.from_paths([[1, 2], [3, 4, 5]])  # nodes 0:1 1:2 2:3 3:4 4:5
    result = verify_greedy(tree, one_hot_logits([3, 0, 0, 4, 5, 6]))
    assert result.accepted_nodes == [2, 3, 4]
    assert result.tokens == [3, 4, 5, 6]


def test_greedy_with_empty_tree_is_plain_decoding():
    result = verify_greedy(DraftTree.empty(), one_hot_logits([6]))
    assert result.tokens == [6] and result.accepted_nodes == []


# --- A Markov "language": the target's and the drafter's next-token distributions depend on the last token.

def markov_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(V, V, generator=generator) * 1.5
    draft_logits = target_logits + torch.randn(V, V, generator=generator) * 1.5  # a related but wrong model
    return target_logits, torch.softmax(draft_logits, dim=-1)


def draft_chain(last: int, q: torch.Tensor, depth: int, generator: torch.Generator) -> DraftTree:
    tokens, rows = [], []
    for _ in range(depth):
        probs = q[last]
        last = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(last)
        rows.append(probs)
    return DraftTree.chain(tokens, torch.stack(rows))


def draft_iid_tree(last: int, q: torch.Tensor, width: int, generator: torch.Generator) -> DraftTree:
    """``width`` i.i.d. samples from q as root children, each with one i.i.d. child of its own."""
    tokens, parents, rows = [], [], []
    for _ in range(width):
        first = int(torch.multinomial(q[last], 1, generator=generator))
        tokens.append(first), parents.append(-1), rows.append(q[last])
    for node in range(width):
        second = int(torch.multinomial(q[tokens[node]], 1, generator=generator))
        tokens.append(second), parents.append(node), rows.append(q[tokens[node]])
    return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.stack(rows))


def point_mass_tree(last: int, generator: torch.Generator) -> DraftTree:
    """Deterministic guesses: three distinct root children, the first with two children."""
    order = torch.randperm(V, generator=generator).tolist()
    sub = torch.randperm(V, generator=generator).tolist()
    return DraftTree.from_paths([[order[0], sub[0]], [order[0], sub[1]], [order[1]], [order[2]]])


def tree_logits(last: int, tree: DraftTree, target_logits: torch.Tensor) -> torch.Tensor:
    rows = [last] + tree.tokens.tolist()
    return target_logits[torch.tensor(rows)]


def generate_two(start: int, target_logits, propose, params, generator) -> tuple[int, int]:
    tokens = [start]
    while len(tokens) < 3:
        tree = propose(tokens[-1], generator)
        result = verify_sampling(tree, tree_logits(tokens[-1], tree, target_logits), params, generator)
        tokens.extend(result.tokens)
    return tokens[1], tokens[2]


def exact_pair_distribution(start: int, target_logits, params) -> np.ndarray:
    probs = probabilities(target_logits, params)
    return np.array([float(probs[start, a] * probs[a, b]) for a, b in itertools.product(range(V), repeat=2)])


def empirical_pair_distribution(samples: list[tuple[int, int]]) -> np.ndarray:
    counts = np.zeros(V * V)
    for a, b in samples:
        counts[a * V + b] += 1
    return counts


PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.3, top_k=3)]


CASES = [
    ("chain-probabilistic", PARAMS[0]),
    ("tree-iid-probabilistic", PARAMS[0]),
    ("tree-point-mass", PARAMS[0]),
    ("chain-probabilistic", PARAMS[1]),
    ("tree-iid-probabilistic", PARAMS[2]),
    ("tree-point-mass", PARAMS[1]),
]


@pytest.mark.parametrize("drafter, params", CASES, ids=[f"{d}-{i}" for i, (d, _) in enumerate(CASES)])
def test_rejection_sampling_keeps_the_target_distribution(drafter, params):
    target_logits, q = markov_tables(seed=1)
    # the drafter proposes from the same filtered family of distributions it would use in the engine
    q = probabilities(torch.log(q), params) if params.top_k or params.top_p < 1 else q
    proposers = {
        "chain-probabilistic": lambda last, g: draft_chain(last, q, 3, g),
        "tree-iid-probabilistic": lambda last, g: draft_iid_tree(last, q, 3, g),
        "tree-point-mass": point_mass_tree,
    }
    generator = torch.Generator().manual_seed(1234)
    samples = [generate_two(0, target_logits, proposers[drafter], params, generator) for _ in range(4000)]
    expected = exact_pair_distribution(0, target_logits, params)
    observed = empirical_pair_distribution(samples)
    support = expected > 0
    assert observed[~support].sum() == 0, "a token outside the target's support was emitted"
    statistic = chisquare(observed[support], expected[support] / expected[support].sum() * observed.sum())
    # 1e-4 per test keeps the false-alarm rate of the whole statistical suite near 1e-3 for any seed;
    # a biased verifier gives p-values far below it (see test_a_biased_verifier_is_detected).
    assert statistic.pvalue > 1e-4, f"emitted tokens do not follow the target distribution: {statistic}"
    total_variation = 0.5 * np.abs(observed / observed.sum() - expected).sum()
    assert total_variation < 0.04


def test_total_variation_shrinks_with_more_samples():
    target_logits, q = markov_tables(seed=2)
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(7)
    expected = exact_pair_distribution(0, target_logits, params)
    samples = [generate_two(0, target_logits, lambda last, g: draft_chain(last, q, 2, g), params, generator)
               for _ in range(4000)]
    tv = [0.5 * np.abs(empirical_pair_distribution(samples[:n]) / n - expected).sum() for n in (100, 4000)]
    assert tv[1] < tv[0] / 2.5


def test_a_biased_verifier_is_detected():
    """The same statistical check must fail for a verifier that is not lossless (typical acceptance)."""
    target_logits, _ = markov_tables(seed=1)
    params = SamplingParams(temperature=1.0)
    generator = torch.Generator().manual_seed(5)
    greedy_guess = lambda last, g: DraftTree.chain([int(target_logits[last].argmax())])

    def lossy_two():
        tokens = [0]
        while len(tokens) < 3:
            tree = greedy_guess(tokens[-1], generator)
            logits = tree_logits(tokens[-1], tree, target_logits)
            tokens.extend(verify_typical_lossy(tree, logits, params, generator, epsilon=0.3, delta=0.9).tokens)
        return tokens[1], tokens[2]

    observed = empirical_pair_distribution([lossy_two() for _ in range(3000)])
    expected = exact_pair_distribution(0, target_logits, params)
    statistic = chisquare(observed, expected / expected.sum() * observed.sum())
    assert statistic.pvalue < 1e-6
