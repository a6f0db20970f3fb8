"""The trained-head drafters ``eagle`` and ``medusa`` on tiny random models (float32).

Terms: **head**, **pair**, **draft vocabulary**: :mod:`quickdraft.heads`; a **briefly trained** head had a few
epochs of :func:`quickdraft.train.loop.train` on the tiny model's own greedy answers. Checked here:

- greedy token identity with plain decoding (engine, and the batch scheduler's shared-cache rows), with an
  untrained and a briefly trained head;
- the eagle drafter's head cache holds exactly what the head computes from the target's true features of the
  committed tokens (the prompt's from the prefill, then each step's root and accepted rows);
- lossless sampling with probabilistic draft trees that have siblings (chi-square against the exact joint
  distribution), and that the check catches a planted bug in the recorded draft distributions;
- a head trained for another model (hidden size, vocabulary, layer count) is refused with an error naming it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from quickdraft.batching import BatchScheduler, ServeRequest
from quickdraft.budget import CostCurve
from quickdraft.drafters import eagle as eagle_module
from quickdraft.drafters.eagle import EagleDrafter
from quickdraft.drafters.medusa import tree_shape
from quickdraft.engine import Engine
from quickdraft.errors import InvalidRequestError
from quickdraft.heads import HeadMismatchError, load_head, new_head, save_head
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM
from quickdraft.sampling import probabilities
from quickdraft.train.data import collect, magpie_prompts
from quickdraft.train.loop import TrainOptions, draft_vocabulary, train
from quickdraft.types import SamplingParams

from conftest import CharTokenizer, tiny_engine, tiny_hf_model, tiny_loaded
from distribution_checks import chi_square_pvalue

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ["eagle", "medusa"]
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [1, 2, 3], [40, 41, 12, 40, 41, 12, 40]]
SHAPE = {"eagle": {}, "medusa": {"num_heads": 3}}


@pytest.fixture(scope="module")
def plain() -> Engine:
    engine = tiny_engine("llama")
    engine.eos_token_ids = frozenset()
    return engine


@pytest.fixture(scope="module")
def heads(plain: Engine) -> dict[str, object]:
    """Per kind an untrained head over most of the vocabulary, and one briefly trained on the model's answers."""
    loaded = plain.loaded
    prompts = magpie_prompts(loaded, 12, 6, seed=1, max_question_tokens=8)
    made = {}
    for kind in KINDS:
        made[kind, "untrained"] = new_head(kind, loaded.target, loaded.tokenizer, list(range(90)), **SHAPE[kind])
        layers = made[kind, "untrained"].config.feature_layers
        samples = collect(loaded, prompts, layers, 40, 6)
        head = new_head(kind, loaded.target, loaded.tokenizer, draft_vocabulary(samples, 64), **SHAPE[kind])
        train(head, samples, TrainOptions(kind=kind, epochs=6, lr=1e-2, batch_size=4))
        made[kind, "trained"] = head
    return made


def speculative(plain: Engine, kind: str, head, budget: int | None = 8, **options) -> Engine:
    engine = plain.with_drafter(kind, {"head": head, **options}, draft_budget=budget)
    engine.eos_token_ids = frozenset()
    return engine


@pytest.mark.parametrize("state", ["untrained", "trained"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_equals_plain_decoding(plain, heads, kind, state):
    engine = speculative(plain, kind, heads[kind, state])
    drafted = accepted = 0
    for prompt in PROMPTS:
        got = engine.generate_ids(prompt, 40)
        assert got.token_ids == plain.generate_ids(prompt, 40).token_ids
        drafted += got.stats.drafted_tokens
        accepted += got.stats.accepted_tokens
    assert drafted > 0
    if state == "trained":
        assert accepted > 0


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_in_the_batch_scheduler_equals_plain_decoding(plain, heads, kind):
    """Shared-cache rows: each request's prompt features come from its own row's prefill."""
    scheduler = BatchScheduler(plain, kind, {"head": heads[kind, "trained"]}, max_batch=3, max_draft=6,
                               cost_curve=CostCurve.flat())
    scheduler.start()
    try:
        sinks = []
        for prompt in PROMPTS:
            tokens, done = [], []
            sink = _sink(tokens, done)
            scheduler.submit(ServeRequest(prompt, 24, SamplingParams(), [], sink))
            sinks.append((prompt, tokens, done))
        for prompt, tokens, done in sinks:
            deadline = 600
            while not done and deadline:
                import time

                time.sleep(0.05)
                deadline -= 1
            assert done and done[0] == "finished"
            expected = plain.generate_ids(prompt, 24).token_ids
            assert tokens[: len(expected)] == expected
    finally:
        scheduler.close()


def _sink(tokens: list[int], done: list[str]):
    from quickdraft.batching import Delta, Failed, Finished

    def sink(event) -> None:
        if isinstance(event, Delta):
            tokens.extend(event.token_ids)
        elif isinstance(event, (Finished, Failed)):
            done.append("finished" if isinstance(event, Finished) else f"failed: {event}")

    return sink


def test_the_eagle_head_cache_holds_the_pairs_of_the_true_features(plain, heads):
    """After a generation, the drafter's cached keys equal the head's keys over the pairs built from a fresh
    forward's features of every committed token: the prompt's and each step's root and accepted rows were
    paired with the right next tokens."""
    head = heads["eagle", "trained"]
    drafter = EagleDrafter(head, plain.loaded.target.vocab_size)
    kept = {}
    drafter.end = lambda: kept.update(cache=drafter.cache, last=drafter._last)  # keep the state at the end
    engine = Engine(plain.loaded, drafter, draft_budget=6)
    engine.eos_token_ids = frozenset()
    result = engine.generate_ids(PROMPTS[0], 30)
    assert result.stats.accepted_tokens > 0
    tokens = PROMPTS[0] + result.token_ids
    count = kept["cache"].length
    session = plain.loaded.target.new_session(len(tokens))
    hidden = session.prefill_hidden(tokens, tuple(head.config.feature_layers)).hidden
    features = head.fused(torch.cat([hidden[layer] for layer in head.config.feature_layers], -1))[:count]
    mask = torch.ones(count, count, dtype=torch.bool).tril()[None]
    with torch.no_grad():
        out, keys, _ = head.step(features[None], torch.tensor(tokens[1 : count + 1])[None],
                                 torch.arange(count)[None], None, mask)
    assert count >= len(tokens) - 8  # every committed token but the last step's is paired
    assert torch.allclose(kept["cache"].view()[0], keys, atol=1e-4)
    assert torch.allclose(kept["last"], out[0, -1], atol=1e-4)


# --- sampling ---------------------------------------------------------------------------------------

VOCAB = 4
SAMPLE_PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]
TESTED = 3
RUNS = 600


@pytest.fixture(scope="module")
def sampling_target():
    """A tiny 4-token target with flat distributions (drafts are rejected as well as accepted) whose next token
    depends strongly on the last one; the exact joint distribution of its first ``TESTED`` sampled tokens."""
    hf_model = tiny_hf_model("llama", seed=3, vocab_size=VOCAB)
    with torch.no_grad():
        hf_model.lm_head.weight.div_(2.0)
        hf_model.model.embed_tokens.weight.mul_(4.0)
    engine = Engine(LoadedModel("tiny", CharTokenizer(VOCAB + 1), hf_model, NativeCausalLM(hf_model)))
    engine.eos_token_ids = frozenset()
    params = SamplingParams(temperature=1.0)
    joint = torch.ones(1, dtype=torch.float64)
    with torch.inference_mode():
        for size in range(TESTED):
            prefixes = torch.tensor([SAMPLE_PROMPT + list(p) for p in itertools.product(range(VOCAB), repeat=size)])
            joint = (joint[:, None] * probabilities(hf_model(prefixes).logits[:, -1], params).double()).reshape(-1)
    return engine, joint.numpy()


def sampled_pvalue(engine: Engine, exact: np.ndarray, budget: int) -> float:
    counts = np.zeros(VOCAB**TESTED)
    drafted = accepted = siblings = 0
    for seed in range(RUNS):
        result = engine.generate_ids(SAMPLE_PROMPT, TESTED + 1, SamplingParams(temperature=1.0, seed=seed))
        counts[np.ravel_multi_index(result.token_ids[:TESTED], (VOCAB,) * TESTED)] += 1
        drafted += result.stats.drafted_tokens
        accepted += result.stats.accepted_tokens
    siblings = _SIBLINGS.pop("seen", 0)
    assert drafted > RUNS and accepted > 0 and siblings > 0, (drafted, accepted, siblings)
    return chi_square_pvalue(counts, exact)


_SIBLINGS: dict[str, int] = {}


def _count_siblings(drafter_class):
    """Wrap ``propose`` to count trees with siblings carrying draft_probs (the case under test)."""
    original = drafter_class.propose

    def propose(self, ctx, budget):
        tree = original(self, ctx, budget)
        if tree.size and not tree.is_chain():
            assert tree.draft_probs is not None and torch.allclose(tree.draft_probs.sum(-1), torch.ones(tree.size))
            _SIBLINGS["seen"] = _SIBLINGS.get("seen", 0) + 1
        return tree

    return propose


@pytest.mark.parametrize("kind, budget", [("eagle", 2), ("eagle", 3), ("medusa", 3)])
def test_sampling_with_sibling_trees_keeps_the_target_distribution(sampling_target, kind, budget, monkeypatch):
    engine, exact = sampling_target
    loaded = engine.loaded
    head = new_head(kind, loaded.target, loaded.tokenizer, list(range(VOCAB)), **SHAPE[kind])
    if kind == "medusa":
        head.config.accuracy = [[0.5, 0.4, 0.1], [0.3, 0.1, 0.1], [0.1, 0.1, 0.1]]  # siblings, then depth
    cls = type(speculative(engine, kind, head).drafter)
    monkeypatch.setattr(cls, "propose", _count_siblings(cls))
    assert sampled_pvalue(speculative(engine, kind, head, budget, top_k=2), exact, budget) > 1e-3


def test_the_sampling_check_catches_draft_distributions_recorded_for_the_wrong_sibling(sampling_target, monkeypatch):
    """Planted bug: each sibling gets the next sibling's draft_probs row (the rows shifted by one, as an indexing
    slip would); the check must reject the outcome distribution."""
    engine, exact = sampling_target
    original = eagle_module.sample_siblings

    def shifted(q, count, generator):
        drawn = original(q, count, generator)
        rows = [row for _, row in drawn]
        return [(token, rows[(j + 1) % len(rows)]) for j, (token, _) in enumerate(drawn)]

    monkeypatch.setattr(eagle_module, "sample_siblings", shifted)
    head = new_head("eagle", engine.loaded.target, engine.loaded.tokenizer, list(range(VOCAB)))
    monkeypatch.setattr(EagleDrafter, "propose", _count_siblings(EagleDrafter))
    assert sampled_pvalue(speculative(engine, "eagle", head, 2, top_k=2), exact, 2) < 1e-3


# --- tree shapes and options -------------------------------------------------------------------------


def test_medusa_tree_shape_follows_expected_acceptance():
    accuracy = [[0.6, 0.2, 0.05], [0.5, 0.3, 0.05]]  # paths: (0)=.6 (0,0)=.3 (1)=.2 (0,1)=.18 (1,0)=.1 ...
    assert tree_shape(accuracy, 4) == [(0,), (1,), (0, 0), (0, 1)]
    assert tree_shape(accuracy, 3) == [(0,), (1,), (0, 0)]
    assert len(tree_shape(accuracy, 100)) == 3 + 3 * 3


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_trees_respect_the_budget_and_put_parents_first(plain, heads, kind):
    drafter = speculative(plain, kind, heads[kind, "trained"]).drafter
    engine = Engine(plain.loaded, drafter, draft_budget=5)
    engine.eos_token_ids = frozenset()
    seen = []
    original = drafter.propose

    def spy(ctx, budget):
        tree = original(ctx, budget)
        seen.append((tree, budget))
        return tree

    drafter.propose = spy
    engine.generate_ids(PROMPTS[0], 20)
    assert seen
    for tree, budget in seen:
        assert tree.size <= budget
        assert all(p < i for i, p in enumerate(tree.parents.tolist()))


# --- a head for another model ------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "named"), [
    ({"hidden_size": 32, "intermediate_size": 64}, "hidden size: head 64, model 32"),
    ({"vocab_size": 80}, "vocabulary size: head 96, model 80"),
    ({"num_hidden_layers": 4}, "layer count: head 3, model 4"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_a_head_for_another_model_is_refused_naming_what_differs(plain, heads, tmp_path, kind, overrides, named):
    save_head(tmp_path, heads[kind, "trained"].config, heads[kind, "trained"])
    other_model = tiny_hf_model("llama", 0, **overrides)
    tokenizer = CharTokenizer(overrides.get("vocab_size", 96))
    other = Engine(LoadedModel("other", tokenizer, other_model, NativeCausalLM(other_model)))
    with pytest.raises(HeadMismatchError, match=named):
        load_head(tmp_path, other.loaded.target, tokenizer, kind)
    with pytest.raises(HeadMismatchError, match="trained for another model"):
        other.with_drafter(kind, {"head": str(tmp_path)})


def test_a_tokenizer_with_another_vocabulary_is_refused(plain, heads, tmp_path):
    save_head(tmp_path, heads["eagle", "trained"].config, heads["eagle", "trained"])

    class Shifted(CharTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(66 + i) for i in ids)

    with pytest.raises(HeadMismatchError, match="vocabulary \\(tokenizer hash\\)"):
        load_head(tmp_path, plain.loaded.target, Shifted(), "eagle")


def test_no_shipped_head_for_a_tiny_model_and_no_hidden_states_on_the_fallback(plain):
    with pytest.raises(HeadMismatchError, match="no shipped eagle head fits"):
        plain.with_drafter("eagle")
    fallback = tiny_loaded("llama", native=False)
    with pytest.raises(InvalidRequestError, match="needs the target's hidden states"):
        Engine(fallback).with_drafter("medusa", {"head": "anything"})


@pytest.mark.parametrize("sampled", [False, True])
def test_auto_merges_the_head_tree_with_the_suffix_tree(plain, heads, sampled):
    """``auto`` with the eagle head among its sources: the head gets the prompt's features through auto, its
    nodes are accepted, and greedy output stays plain decoding's (sampling: point masses, still lossless)."""
    engine = plain.with_drafter("auto", {"sources": "suffix,eagle", "head": heads["eagle", "trained"]},
                                draft_budget=8)
    engine.eos_token_ids = frozenset()
    eagle_source = engine.drafter.sources[1]
    assert engine.drafter.needs == {"hidden_states"} and engine.drafter.hidden_layers == eagle_source.hidden_layers
    accepted = 0
    for seed, prompt in enumerate(PROMPTS):
        params = SamplingParams(temperature=1.0, seed=seed) if sampled else SamplingParams()
        got = engine.generate_ids(prompt, 30, params)
        accepted += got.stats.accepted_tokens
        if not sampled:
            assert got.token_ids == plain.generate_ids(prompt, 30).token_ids
    assert accepted > 0
