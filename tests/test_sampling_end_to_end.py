"""Lossless sampling end to end: what a speculating engine or batch scheduler samples follows the target.

Terms used here:

- **tested tokens**: the first ``TESTED`` tokens sampled after ``PROMPT``. Each run generates ``NEW_TOKENS``
  (more than ``TESTED``), so that the first verification step already has room for ``BUDGET`` draft nodes and
  every tested token after the first (which the prefill samples) can be an accepted draft token, a bonus
  token drawn from a residual after rejections, or a token from a later step.
- **exact distribution**: the target's joint probability of each tested-token sequence,
  ``p(t1) p(t2 | t1) ... p(tK | t1 .. tK-1)``, with every factor taken from a teacher-forced forward of the
  Hugging Face model (not of the engine) over that prefix; ``VOCAB ** TESTED`` outcomes.
- **speculating**: over all runs, draft tokens were verified (``drafted_tokens > 0``) and some were accepted
  (``accepted_tokens > 0``); a test that never speculates would pass for any verifier.

The observed outcome counts are compared with the exact distribution by Pearson's chi-square test, outcomes
expected fewer than five times pooled into one. Seeds are fixed, so each test is deterministic.
``RUNS`` was chosen by measured power: with the real verifier the p-values were 0.14 and above, while each
planted bug (a residual left out, every draft accepted, acceptance 1.5 times too likely, the logits row before
the right one after an acceptance, each row of the batched forward given another row's logits) gave
p < 1e-7 for the ngram and draft drafters, in the engine and in the batch scheduler.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from quickdraft import verify
from quickdraft.batching import BatchScheduler, Delta, Failed, Finished, ServeRequest, StepInfo
from quickdraft.budget import CostCurve
from quickdraft.engine import Engine
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM
from quickdraft.sampling import probabilities
from quickdraft.types import GenerationStats, SamplingParams

from conftest import CharTokenizer, perturbed_copy, tiny_hf_model
from distribution_checks import chi_square_pvalue

VOCAB = 4
#: Divides the tiny model's output layer: flatter distributions, so drafts are rejected as well as accepted.
FLATTEN = 2.0
#: Multiplies its input embeddings: each next-token distribution then depends strongly on the last token, so
#: logits taken from the wrong row or the wrong context change the outcome distribution visibly.
EMBEDDING_SCALE = 4.0
PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive, so that the ngram and suffix drafters find matches
NEW_TOKENS = 4
TESTED = 3
BUDGET = 2  # draft nodes per step: trees of two siblings exercise the residual after a rejected candidate
RUNS = 600  # seeds per test
BATCH = 8  # the scheduler's cache rows: requests verified together in one forward
ALPHA = 1e-3
PARAMS = SamplingParams(temperature=1.0)

SAMPLING_DRAFTERS = ["ngram", "draft"] + [pytest.param(name, marks=pytest.mark.slow)
                                          for name in ("suffix", "recycle", "lookahead", "auto")]


@dataclass
class Target:
    """The tiny target under test and the exact distribution of its tested tokens."""

    hf_model: torch.nn.Module
    engine: Engine
    exact: np.ndarray

    def drafter_options(self, drafter: str) -> dict[str, Any] | None:
        """Options for ``drafter``: the ``draft`` drafter gets a noisy copy of the target as its model."""
        if drafter == "draft":
            return {"model": NativeCausalLM(perturbed_copy(self.hf_model, scale=0.3))}
        return None


@dataclass
class Samples:
    """Outcome counts of the tested tokens over many runs, and the draft tokens verified and accepted."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(VOCAB**TESTED))
    drafted: int = 0
    accepted: int = 0

    def add(self, token_ids: list[int], stats: GenerationStats) -> None:
        assert len(token_ids) == NEW_TOKENS
        self.counts[np.ravel_multi_index(token_ids[:TESTED], (VOCAB,) * TESTED)] += 1
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens

    def pvalue(self, exact: np.ndarray) -> float:
        return chi_square_pvalue(self.counts, exact)

    def check(self, exact: np.ndarray) -> None:
        """Fail unless the runs speculated and their outcomes follow ``exact``."""
        assert self.drafted > 0 and self.accepted > 0, "no draft token was verified or accepted"
        pvalue = self.pvalue(exact)
        assert pvalue > ALPHA, f"sampled tokens do not follow the target distribution (p = {pvalue:.2e})"


def exact_distribution(hf_model: torch.nn.Module, prompt: list[int], length: int,
                       params: SamplingParams) -> np.ndarray:
    """The joint probability of every ``length``-token continuation of ``prompt`` (see the module docstring),
    flattened in the order of ``np.ravel_multi_index``: the first token is the most significant digit."""
    vocab = hf_model.config.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    with torch.inference_mode():
        for size in range(length):
            prefixes = torch.tensor([prompt + list(p) for p in itertools.product(range(vocab), repeat=size)])
            following = probabilities(hf_model(prefixes).logits[:, -1], params).double()
            joint = (joint[:, None] * following).reshape(-1)
    return joint.numpy()


def make_target(flatten: float = FLATTEN, embedding_scale: float = EMBEDDING_SCALE) -> Target:
    """The tiny llama target over ``VOCAB`` tokens (see ``FLATTEN`` and ``EMBEDDING_SCALE``)."""
    hf_model = tiny_hf_model("llama", seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        hf_model.lm_head.weight.div_(flatten)
        hf_model.model.embed_tokens.weight.mul_(embedding_scale)
    engine = Engine(LoadedModel("tiny", CharTokenizer(VOCAB + 1), hf_model, NativeCausalLM(hf_model)))
    return Target(hf_model, engine, exact_distribution(hf_model, PROMPT, TESTED, PARAMS))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def target(one_torch_thread: None) -> Target:
    return make_target()


def engine_samples(target: Target, drafter: str, runs: int = RUNS) -> Samples:
    """Tested tokens of ``runs`` generations by the engine with ``drafter``, seeds ``0 .. runs - 1``."""
    engine = target.engine.with_drafter(drafter, target.drafter_options(drafter), draft_budget=BUDGET)
    engine.eos_token_ids = frozenset()  # the tiny llama config calls token 2 EOS
    samples = Samples()
    for seed in range(runs):
        result = engine.generate_ids(PROMPT, NEW_TOKENS, SamplingParams(temperature=PARAMS.temperature, seed=seed))
        samples.add(result.token_ids, result.stats)
    return samples


@pytest.mark.parametrize("drafter", SAMPLING_DRAFTERS)
def test_speculative_sampling_keeps_the_target_distribution_end_to_end(target, drafter):
    engine_samples(target, drafter).check(target.exact)


#: Verification bugs planted to show that the check above can fail: (function of quickdraft.verify, stand-in).
PLANTED_BUGS = {
    "residual left out": ("_residual", lambda p, q: p),
    "acceptance 1.5 times too likely": ("_acceptance_ratio", lambda p, q: min(1.0, 1.5 * float(p) / float(q))),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_the_distribution_check_catches_a_planted_verification_bug(target, bug, monkeypatch):
    """The check has power: with a broken verifier the same runs are rejected."""
    name, stand_in = PLANTED_BUGS[bug]
    monkeypatch.setattr(verify, name, stand_in)
    assert engine_samples(target, "ngram").pvalue(target.exact) < ALPHA


class Request:
    """One scheduler request's sink: its committed tokens and its final stats (called from the scheduler
    thread); ``done`` is set by the Finished or Failed event."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.final: Finished | Failed | None = None
        self.done = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, Delta):
            self.tokens.extend(event.token_ids)
        elif isinstance(event, (Finished, Failed)):
            self.final = event
            self.done.set()


@contextmanager
def scheduler_for(target: Target, drafter: str, steps: list[StepInfo]) -> Iterator[BatchScheduler]:
    """A started scheduler of ``BATCH`` rows on the target with ``drafter``, always drafting ``BUDGET`` nodes
    (a flat cost curve), recording its steps in ``steps``; closed afterwards."""
    engine = Engine(target.engine.loaded)
    engine.eos_token_ids = frozenset()
    scheduler = BatchScheduler(engine, drafter, target.drafter_options(drafter), max_batch=BATCH,
                               max_draft=BUDGET, cost_curve=CostCurve.flat(), max_waiting=RUNS,
                               on_step=steps.append)
    try:
        yield scheduler.start()
    finally:
        scheduler.close()


def batch_samples(target: Target, drafter: str, runs: int = RUNS) -> tuple[Samples, list[StepInfo]]:
    """Tested tokens of ``runs`` requests (seeds ``0 .. runs - 1``) submitted at once to a scheduler with
    ``drafter``, so that up to ``BATCH`` of them are verified together in each target forward; and the
    scheduler's steps."""
    steps: list[StepInfo] = []
    requests = [Request() for _ in range(runs)]
    with scheduler_for(target, drafter, steps) as scheduler:
        for seed, request in enumerate(requests):
            params = SamplingParams(temperature=PARAMS.temperature, seed=seed)
            scheduler.submit(ServeRequest(PROMPT, NEW_TOKENS, params, [], request))
        for request in requests:
            assert request.done.wait(120), "a request never finished"
    samples = Samples()
    for request in requests:
        assert isinstance(request.final, Finished), request.final
        samples.add(request.tokens, request.final.stats)
    return samples, steps


@pytest.mark.parametrize("drafter", SAMPLING_DRAFTERS)
def test_batched_speculative_sampling_keeps_the_target_distribution(target, drafter):
    """Concurrent sampled requests with different seeds, verified together in ragged batched forwards: the
    pooled tested tokens of all requests follow the exact distribution, and drafts were verified in steps
    that served several sequences at once."""
    samples, steps = batch_samples(target, drafter)
    assert any(step.batch > 1 and step.budget > 0 for step in steps), "no batched step speculated"
    samples.check(target.exact)
