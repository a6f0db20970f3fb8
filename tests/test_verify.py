"""Verification: greedy acceptance, and the statistical proof that rejection sampling keeps the target
distribution, with the proof that this proof can fail.

The statistical tests run a toy Markov "language" (see :class:`Language`) and compare the first two tokens the
verifier emits after a fixed start token with the target's exact pair distribution. A *family* is a kind of drafter:
probabilistic drafts (``draft_probs`` recorded) as a chain or as a tree of i.i.d. siblings, and deterministic drafts
(point masses) correlated with the target, as a chain or as a tree of siblings. The real verifier must pass every
family under every sampling filter; each mutant of ``verify_mutants.py`` (one planted bug) must fail at least one
family where its bug matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from quickdraft.sampling import probabilities
from quickdraft.types import DraftTree, SamplingParams
from quickdraft.verify import verify_greedy, verify_sampling, verify_typical_lossy

from verify_mutants import MUTANTS, Mutant, Verifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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



# --- A Markov "language" and its drafters.

VOCAB = 5
START = 0  # the last committed token before the two tokens each run emits


@dataclass(frozen=True)
class Language:
    """A toy language whose next-token distributions depend only on the last token.

    ``target_logits[a]`` are the target model's logits after token ``a``; ``target[a]`` and ``drafter[a]`` are the
    distributions the target and the draft model sample from after ``a`` under the request's ``SamplingParams``
    (the same filters apply to both, as in the engine)."""

    target_logits: torch.Tensor
    target: torch.Tensor
    drafter: torch.Tensor


def markov_language(params: SamplingParams, seed: int = 1) -> Language:
    """Random target logits, and a draft model whose logits are the target's plus noise (related but wrong)."""
    generator = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(VOCAB, VOCAB, generator=generator) * 1.5
    draft_logits = target_logits + torch.randn(VOCAB, VOCAB, generator=generator)
    return Language(target_logits, probabilities(target_logits, params), probabilities(draft_logits, params))


Proposer = Callable[[int, Language, np.random.Generator], DraftTree]


def draw(distribution: torch.Tensor, rng: np.random.Generator) -> int:
    """One token from ``distribution`` by inverting its cumulative sum (cheaper than torch.multinomial)."""
    cumulative = np.cumsum(distribution.numpy(), dtype=np.float64)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), VOCAB - 1)


def sampled_chain(last: int, language: Language, rng: np.random.Generator, depth: int = 3) -> DraftTree:
    """A draft model's chain: each token drawn from the drafter's distribution after the one before."""
    tokens, rows = [], []
    for _ in range(depth):
        rows.append(language.drafter[last])
        last = draw(rows[-1], rng)
        tokens.append(last)
    return DraftTree.chain(tokens, torch.stack(rows))


def sampled_tree(last: int, language: Language, rng: np.random.Generator, width: int = 3) -> DraftTree:
    """``width`` i.i.d. draws from the drafter as the root's children, each with one drawn child of its own."""
    firsts = [draw(language.drafter[last], rng) for _ in range(width)]
    seconds = [draw(language.drafter[first], rng) for first in firsts]
    rows = [language.drafter[last]] * width + [language.drafter[first] for first in firsts]
    parents = [-1] * width + list(range(width))
    return DraftTree(torch.tensor(firsts + seconds), torch.tensor(parents), torch.stack(rows))


def argmax_chain(last: int, language: Language, rng: np.random.Generator, depth: int = 3) -> DraftTree:
    """Point masses: the chain of the target's most likely tokens (a drafter that knows the target well)."""
    tokens = []
    for _ in range(depth):
        last = int(language.target[last].argmax())
        tokens.append(last)
    return DraftTree.chain(tokens)


def mostly_right_chain(last: int, language: Language, rng: np.random.Generator, depth: int = 3) -> DraftTree:
    """Point masses: each token is the target's most likely one with probability 3/4, else another one chosen
    uniformly (a drafter that is right most of the time)."""
    tokens = []
    for _ in range(depth):
        best = int(language.target[last].argmax())
        last = best if rng.random() < 0.75 else (best + int(rng.integers(1, VOCAB))) % VOCAB
        tokens.append(last)
    return DraftTree.chain(tokens)


def top_k_tree(last: int, language: Language, rng: np.random.Generator) -> DraftTree:
    """Point masses: the target's 3 most likely tokens as siblings, each followed by its 2 most likely ones
    (under a top-k or top-p filter some of them lie outside the target's support)."""
    paths = []
    for first in language.target[last].topk(3).indices.tolist():
        paths += [[first, second] for second in language.target[first].topk(2).indices.tolist()]
    return DraftTree.from_paths(paths)


FAMILIES: dict[str, Proposer] = {
    "chain-probabilistic": sampled_chain,
    "tree-iid-probabilistic": sampled_tree,
    "chain-point-mass-argmax": argmax_chain,
    "chain-point-mass-mostly-right": mostly_right_chain,
    "tree-point-mass-top-k": top_k_tree,
}
PROBABILISTIC = ("chain-probabilistic", "tree-iid-probabilistic")
POINT_MASS = ("chain-point-mass-argmax", "chain-point-mass-mostly-right", "tree-point-mass-top-k")
WITH_SIBLINGS = ("tree-iid-probabilistic", "tree-point-mass-top-k")


# --- The statistical test: emitted token pairs against the target's exact pair distribution.

SAMPLES = 2000  # runs per (verifier, family, params): see the power measured for the planted bugs below
P_VALUE_THRESHOLD = 1e-4  # per test: the 30 tests of the real verifier raise a false alarm for ~0.3% of seeds


def first_two_tokens(verifier: Verifier, propose: Proposer, language: Language, params: SamplingParams,
                     rng: np.random.Generator, generator: torch.Generator) -> tuple[int, int]:
    """Speculative decoding from ``START`` until two tokens are emitted (one or two verification steps)."""
    emitted: list[int] = []
    last = START
    while len(emitted) < 2:
        tree = propose(last, language, rng)
        logits = language.target_logits[[last] + tree.tokens.tolist()]
        emitted += verifier(tree, logits, params, generator).tokens
        last = emitted[-1]
    return emitted[0], emitted[1]


@dataclass(frozen=True)
class Verdict:
    """How emitted (first, second) token pairs compare with the target's exact pair distribution.

    ``p_value``: chi-square goodness of fit over the target's support, pooling the pairs expected fewer than 5
    times into one cell; 0 when a pair outside the support was emitted. ``total_variation``: half the L1 distance
    between the empirical and the exact distribution; ``tv_limit``: see :func:`total_variation_limit`."""

    p_value: float
    total_variation: float
    tv_limit: float

    @property
    def detected(self) -> bool:
        return self.p_value < P_VALUE_THRESHOLD or self.total_variation > self.tv_limit

    def __str__(self) -> str:
        return f"p={self.p_value:.1e} TV={self.total_variation:.3f} (limit {self.tv_limit:.3f})"


def total_variation_limit(expected: np.ndarray, samples: int) -> float:
    """A total variation that ``samples`` draws from ``expected`` exceed with probability below the threshold.

    Its mean is at most ``0.5 * sum(sqrt(p (1 - p) / n))`` (Jensen), and one draw moves it by at most ``1 / n``,
    so it exceeds its mean by ``t`` with probability at most ``exp(-2 n t**2)`` (McDiarmid)."""
    mean_bound = 0.5 * np.sqrt(expected * (1 - expected) / samples).sum()
    return float(mean_bound + np.sqrt(np.log(1 / P_VALUE_THRESHOLD) / (2 * samples)))


def judge(counts: np.ndarray, expected: np.ndarray) -> Verdict:
    """The :class:`Verdict` for pair ``counts`` against the exact pair distribution ``expected`` (flat arrays)."""
    samples = int(counts.sum())
    total_variation = 0.5 * np.abs(counts / samples - expected).sum()
    tv_limit = total_variation_limit(expected, samples)
    if counts[expected == 0].any():
        return Verdict(0.0, total_variation, tv_limit)
    common = expected * samples >= 5
    observed = np.append(counts[common], counts[~common].sum())
    predicted = np.append(expected[common], expected[~common].sum()) * samples
    keep = predicted > 0
    return Verdict(float(chisquare(observed[keep], predicted[keep]).pvalue), total_variation, tv_limit)


def verdict(verifier: Verifier, family: str, params: SamplingParams, samples: int = SAMPLES, seed: int = 0) -> Verdict:
    """Run ``verifier`` on drafts of ``family`` ``samples`` times and judge the emitted pairs."""
    language = markov_language(params)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    counts = np.zeros(VOCAB * VOCAB)
    for _ in range(samples):
        first, second = first_two_tokens(verifier, FAMILIES[family], language, params, rng, generator)
        counts[first * VOCAB + second] += 1
    expected = (language.target[START][:, None] * language.target).flatten().double().numpy()
    return judge(counts, expected / expected.sum())


BASE_PARAMS = SamplingParams(temperature=1.0)
FILTERED_PARAMS = {
    "T0.5": SamplingParams(temperature=0.5),
    "T0.7-top_p0.9": SamplingParams(temperature=0.7, top_p=0.9),  # leaves one token after most tokens
    "T2-top_k3": SamplingParams(temperature=2.0, top_k=3),
    "T1.5-top_k4-top_p0.9": SamplingParams(temperature=1.5, top_k=4, top_p=0.9),
    "T1.5-min_p0.1": SamplingParams(temperature=1.5, min_p=0.1),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("params", FILTERED_PARAMS.values(), ids=FILTERED_PARAMS)
def test_rejection_sampling_keeps_the_target_distribution_under_sampling_filters(family, params):
    result = verdict(verify_sampling, family, params)
    assert not result.detected, f"emitted tokens do not follow the target distribution: {result}"


# The families whose drafts exercise each mutant's bug (see verify_mutants.py): there it must be detected.
ALL_FAMILIES = tuple(FAMILIES)
MUTANT_FAMILIES = {
    "always-accept": ALL_FAMILIES,
    "bonus-from-target-not-residual": ALL_FAMILIES,
    "sibling-tested-against-original-p": WITH_SIBLINGS,
    "rejected-siblings-return-to-residual": WITH_SIBLINGS,
    "draft-probs-at-another-temperature": PROBABILISTIC,
    "target-row-off-by-one": ALL_FAMILIES,
    "point-mass-residual-skipped": POINT_MASS,
}
# Each verifier with the families that must detect it; the real one has none and must pass them all.
VERIFIERS: dict[str, tuple[Verifier, tuple[str, ...]]] = {
    "lossless (verify_sampling)": (verify_sampling, ()),
    **{mutant.name: (mutant.verifier(), MUTANT_FAMILIES[mutant.name]) for mutant in MUTANTS},
    "typical-acceptance (lossy by design)": (verify_typical_lossy, ALL_FAMILIES),
}


@pytest.mark.parametrize("name", VERIFIERS)
def test_each_planted_bug_is_detected_and_the_real_verifier_passes(name):
    """Every statistical family runs against every verifier (at temperature 1, no filter). Measured power: over
    seeds 0-4 at 2000 samples, the weakest required detection (rejected-siblings-return-to-residual on
    tree-iid-probabilistic) had p <= 3e-15 (TV >= 0.10, limit 0.084), every other one p <= 1e-29; at 1000 samples
    that weakest one still had p <= 3e-8. The real verifier's p-values were all >= 0.02."""
    verifier, must_detect = VERIFIERS[name]
    verdicts = {family: verdict(verifier, family, BASE_PARAMS) for family in FAMILIES}
    report = "\n".join(f"  {family}: {result}{' DETECTED' if result.detected else ''}"
                       for family, result in verdicts.items())
    detected = {family for family, result in verdicts.items() if result.detected}
    if must_detect:
        assert detected >= set(must_detect), f"{name} escaped a family that exercises its bug:\n{report}"
    else:
        assert not detected, f"{name} failed a statistical family:\n{report}"


def test_a_mutant_that_changes_nothing_is_the_real_verifier():
    """The mutation machinery plants nothing but its one line: rebuilt with that line unchanged, a mutant emits
    exactly what verify_sampling emits, draw for draw."""
    line = "p = _residual(p, q)"
    unchanged = Mutant("unchanged", line, line).verifier()
    assert unchanged is not verify_sampling
    language = markov_language(BASE_PARAMS)
    for family, propose in FAMILIES.items():
        runs = []
        for verifier in (verify_sampling, unchanged):
            rng, generator = np.random.default_rng(3), torch.Generator().manual_seed(3)
            runs.append([first_two_tokens(verifier, propose, language, BASE_PARAMS, rng, generator)
                         for _ in range(100)])
        assert runs[0] == runs[1], family
