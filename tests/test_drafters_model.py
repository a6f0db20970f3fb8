"""Model-based drafters: ``xvocab`` (a draft model with another tokenizer) and ``layerskip`` (self-speculation).

The xvocab tests use two small tokenizers over the same alphabet: a character-level one and one that maps
pairs of common characters to single ids, so that target and draft tokenize the same text differently and
token boundaries move. Random tiny draft models rarely agree with the target, so acceptance is checked with
an *oracle* draft model that knows the target's greedy continuation as text and proposes it in its own
vocabulary: that exercises the whole text -> target-token mapping end to end.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from quickdraft.drafters import DrafterSetup, create_drafter
from quickdraft.drafters.layerskip import LayerSkipDrafter, default_skip_set, perturb, skippable_layers
from quickdraft.drafters.xvocab import (
    CrossVocabDrafter,
    common_prefix_length,
    continuation_text,
    draft_text_to_target_tokens,
    faithful_prefix,
)
from quickdraft.engine import Engine
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import TargetModel, TargetSession
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM
from quickdraft.sampling import probabilities
from quickdraft.types import SamplingParams

from conftest import CharTokenizer, tiny_engine, tiny_hf_model
from distribution_checks import chi_square_pvalue

ALPHABET = "abcdefgh ."
PAIR_CHARS = "abcdefgh "


class CharLevelTokenizer:
    """One id per character of ``alphabet``; EOS is the last id."""

    chat_template = None

    def __init__(self, alphabet: str = ALPHABET) -> None:
        self.pieces = list(alphabet)
        self.eos_token_id = len(self.pieces)
        self.vocab_size = len(self.pieces) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.pieces.index(c) for c in text]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids if i != self.eos_token_id)


class PairTokenizer(CharLevelTokenizer):
    """Single characters plus one id per pair of ``pair_chars``; encodes greedily left to right, a pair
    whenever the next two characters form one."""

    def __init__(self, alphabet: str = ALPHABET, pair_chars: str = PAIR_CHARS) -> None:
        pieces = list(alphabet) + [a + b for a, b in itertools.product(pair_chars, repeat=2)]
        self.pieces = pieces
        self.index = {piece: i for i, piece in enumerate(pieces)}
        self.eos_token_id = len(pieces)
        self.vocab_size = len(pieces) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text[i : i + 2] in self.index and i + 1 < len(text):
                ids.append(self.index[text[i : i + 2]])
                i += 2
            else:
                ids.append(self.index[text[i]])
                i += 1
        return ids


class ByteTokenizer:
    """UTF-8 bytes; decoding an incomplete character gives U+FFFD."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


CHARS, PAIRS = CharLevelTokenizer(), PairTokenizer()


# --- the text -> token mapping, on known strings ------------------------------------------------------


def test_char_level_target_gets_the_draft_text_minus_its_last_token():
    committed = CHARS.encode("abc d")
    assert draft_text_to_target_tokens(CHARS, committed, "efg h") == CHARS.encode("efg ")
    assert draft_text_to_target_tokens(CHARS, committed, "efg h", complete=True) == CHARS.encode("efg h")
    assert draft_text_to_target_tokens(CHARS, committed, "") == []


def test_pair_target_with_a_stable_boundary_continues_after_the_tail():
    committed = PAIRS.encode("ab")
    tokens = draft_text_to_target_tokens(PAIRS, committed, "cdef")
    assert tokens == PAIRS.encode("cd")
    assert PAIRS.decode(committed + tokens) == "abcd"


def test_pair_target_where_the_draft_text_merges_with_the_tail_is_encoded_on_its_own():
    committed = [PAIRS.index["ab"], PAIRS.index["c"]]  # "abc" would re-encode as "ab" "c", then "cd" merges
    tokens = draft_text_to_target_tokens(PAIRS, committed, "de fg")
    assert tokens == [PAIRS.index["de"], PAIRS.index[" f"]]  # "g" dropped: it may grow into a pair
    assert PAIRS.decode(committed + tokens) == "abcde f"


def test_faithful_prefix_drops_tokens_that_do_not_spell_the_draft_text():
    tail = CHARS.encode("ab")
    wrong = CHARS.encode("cdh")
    assert faithful_prefix(CHARS, tail, "ab", "cde", wrong) == CHARS.encode("cd")
    assert faithful_prefix(CHARS, tail, "ab", "cde", CHARS.encode("h")) == []


def test_continuation_text_drops_an_incomplete_trailing_character():
    context, accent = list(b"ab"), list("é".encode())
    assert continuation_text(ByteTokenizer(), context, accent) == "é"
    assert continuation_text(ByteTokenizer(), context, accent[:1]) == ""
    assert continuation_text(PAIRS, PAIRS.encode("ab c"), PAIRS.encode("de")) == "de"


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0


# --- an oracle draft model in another vocabulary ----------------------------------------------------


class OracleDraft(TargetModel):
    """A 'model' over ``tokenizer``'s vocabulary that knows the text ``truth``: after ids whose text is a
    prefix of it, it predicts the first token of the rest (EOS at its end); otherwise token 0."""

    max_context = 4096
    num_layers = 1
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, tokenizer, truth: str) -> None:
        self.tokenizer, self.truth = tokenizer, truth
        self.vocab_size = tokenizer.vocab_size
        self.sessions: list[OracleSession] = []

    def new_session(self, max_len: int) -> OracleSession:
        self.sessions.append(OracleSession(self))
        return self.sessions[-1]


class OracleSession(TargetSession):
    def __init__(self, model: OracleDraft) -> None:
        self.model, self.ids, self.fed_texts = model, [], []

    @property
    def cached_length(self) -> int:
        return len(self.ids)

    def prefill(self, prompt_ids):
        self.ids = []
        return self.extend(prompt_ids)

    def extend(self, token_ids):
        self.ids.extend(token_ids)
        text = self.model.tokenizer.decode(self.ids)
        self.fed_texts.append(text)
        logits = torch.zeros(self.model.vocab_size)
        rest = self.model.truth[len(text):] if self.model.truth.startswith(text) else None
        if rest is None:
            logits[0] = 1.0
        elif rest:
            logits[self.model.tokenizer.encode(rest)[0]] = 1.0
        else:
            logits[self.model.tokenizer.eos_token_id] = 1.0
        return logits

    def truncate(self, length):
        del self.ids[length:]

    def verify(self, root, tree, hidden_layers=()):
        raise NotImplementedError

    def commit(self, accepted_nodes):
        raise NotImplementedError


def char_target(seed: int = 0, tokenizer=CHARS, architecture: str = "llama", native: bool = True) -> Engine:
    hf_model = tiny_hf_model(architecture, seed, vocab_size=tokenizer.vocab_size)
    from quickdraft.models.hf import HFCausalLM

    target = NativeCausalLM(hf_model) if native else HFCausalLM(hf_model)
    return Engine(LoadedModel(f"tiny-{architecture}", tokenizer, hf_model, target))


def xvocab(engine: Engine, draft: TargetModel, tokenizer, budget: int = 8, **options) -> Engine:
    return engine.with_drafter("xvocab", {"model": draft, "tokenizer": tokenizer, **options}, draft_budget=budget)


PROMPTS = ["abc abc ab", "hgf.e dd", "a.b.c.d.e"]


@pytest.mark.parametrize("target_tokenizer, draft_tokenizer", [(CHARS, PAIRS), (PAIRS, CHARS)],
                         ids=["chars-target", "pairs-target"])
def test_oracle_draft_in_another_vocabulary_is_accepted_and_output_is_identical(target_tokenizer, draft_tokenizer):
    plain = char_target(tokenizer=target_tokenizer)
    plain.eos_token_ids = frozenset()
    accepted = 0
    for prompt in PROMPTS:
        ids = target_tokenizer.encode(prompt)
        expected = plain.generate_ids(ids, 40)
        truth = target_tokenizer.decode(ids + expected.token_ids)
        oracle = OracleDraft(draft_tokenizer, truth)
        speculative = xvocab(plain, oracle, draft_tokenizer)
        speculative.eos_token_ids = frozenset()
        got = speculative.generate_ids(ids, 40)
        assert got.token_ids == expected.token_ids
        assert all(truth.startswith(text) for text in oracle.sessions[-1].fed_texts[:-1])
        accepted += got.stats.accepted_tokens
        if target_tokenizer is CHARS:  # every character is a token: the mapping is exact up to the last one
            assert got.stats.tau > 3.0, got.stats
    assert accepted > 0


class CheckedDrafter(CrossVocabDrafter):
    """Asserts after every proposal that the draft cache holds the draft ids of the committed text."""

    def propose(self, ctx, budget):
        tree = super().propose(ctx, budget)
        expected = self._draft_ids(ctx)
        assert self._session.ids[: len(expected)] == expected
        return tree


def test_draft_cache_follows_the_committed_text_after_divergences():
    plain = char_target(seed=2)
    plain.eos_token_ids = frozenset()
    prompt = CHARS.encode(PROMPTS[0])
    oracle = OracleDraft(PAIRS, PROMPTS[0] + "ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab")  # mostly wrong
    engine = Engine(plain.loaded, CheckedDrafter(oracle, PAIRS, CHARS, k=4), draft_budget=5)
    engine.eos_token_ids = frozenset()
    got = engine.generate_ids(prompt, 30)
    assert got.token_ids == plain.generate_ids(prompt, 30).token_ids
    assert got.stats.drafted_tokens > got.stats.accepted_tokens  # there were rejections to roll back


@pytest.mark.parametrize("architecture, native", [("llama", True), ("qwen3", True), ("llama", False)])
def test_random_draft_model_with_another_tokenizer_keeps_greedy_output(architecture, native):
    plain = char_target(architecture=architecture, native=native)
    draft = NativeCausalLM(tiny_hf_model("llama", 5, vocab_size=PAIRS.vocab_size))
    speculative = xvocab(plain, draft, PAIRS, k=5)
    drafted = 0
    for prompt in PROMPTS:
        ids = CHARS.encode(prompt)
        expected = plain.generate_ids(ids, 30)
        got = speculative.generate_ids(ids, 30)
        assert got.token_ids == expected.token_ids and got.finish_reason == expected.finish_reason
        drafted += got.stats.drafted_tokens
    assert drafted > 0


def test_xvocab_keeps_the_target_distribution_when_sampling():
    """Four sampled tokens after a fixed prompt (the second step verifies up to two proposals): the joint
    distribution of tokens 2 and 3 equals the target's exact marginal sum_a p(a) p(b|a) p(c|a,b)."""
    alphabet = "abcdefg"
    chars, pairs = CharLevelTokenizer(alphabet), PairTokenizer(alphabet, alphabet)
    vocab = chars.vocab_size  # 8, EOS included but disabled below
    hf_model = tiny_hf_model("llama", seed=3, vocab_size=vocab)
    hf_model.lm_head.weight.data /= 4.0  # flatter distributions: every pair has visible mass
    plain = Engine(LoadedModel("tiny", chars, hf_model, NativeCausalLM(hf_model)))
    draft = NativeCausalLM(tiny_hf_model("llama", seed=4, vocab_size=pairs.vocab_size))
    engine = xvocab(plain, draft, pairs, budget=2, k=4)
    engine.eos_token_ids = frozenset()
    prompt = chars.encode("abcabcab")
    runs = 600
    counts = np.zeros(vocab * vocab)
    drafted = accepted = 0
    for seed in range(runs):
        result = engine.generate_ids(prompt, 4, SamplingParams(temperature=1.0, seed=seed))
        counts[result.token_ids[1] * vocab + result.token_ids[2]] += 1
        drafted += result.stats.drafted_tokens
        accepted += result.stats.accepted_tokens
    assert drafted > runs and accepted > 0  # the speculative path really ran, and drafts were verified
    expected = _marginal_of_tokens_two_and_three(hf_model, prompt, vocab)
    assert chi_square_pvalue(counts, expected) > 1e-4


def _marginal_of_tokens_two_and_three(hf_model, prompt: list[int], vocab: int) -> np.ndarray:
    params = SamplingParams(temperature=1.0)
    with torch.inference_mode():
        def dist(ids: list[list[int]]) -> torch.Tensor:
            return probabilities(hf_model(torch.tensor(ids)).logits[:, -1], params)

        first = dist([prompt])[0]
        second = dist([prompt + [a] for a in range(vocab)])
        third = dist([prompt + [a, b] for a in range(vocab) for b in range(vocab)]).view(vocab, vocab, vocab)
    joint = first[:, None, None] * second[:, :, None] * third
    return joint.sum(0).reshape(-1).double().numpy()


def test_xvocab_options_are_checked():
    plain = char_target()
    with pytest.raises(InvalidRequestError, match="needs a draft model"):
        plain.with_drafter("xvocab")
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        plain.with_drafter("xvocab", {"model": OracleDraft(PAIRS, "")})
    message = "has no option 'depth'; its options are: dtype, k, model, tokenizer, window"
    with pytest.raises(InvalidRequestError, match=message):
        plain.with_drafter("xvocab", {"model": OracleDraft(PAIRS, ""), "tokenizer": PAIRS, "depth": 3})


# --- layerskip -------------------------------------------------------------------------------------


def test_default_skip_set_skips_every_other_middle_layer():
    assert default_skip_set(3) == {1}
    assert default_skip_set(8) == {1, 3, 5}
    assert default_skip_set(2) == {0}
    assert skippable_layers(30) == list(range(1, 29))


def test_perturbation_stays_within_the_allowed_layers_and_never_empties_the_set():
    import random

    rng = random.Random(0)
    allowed = skippable_layers(12)
    skip = default_skip_set(12)
    for _ in range(200):
        candidate = perturb(skip, allowed, rng)
        assert candidate and candidate <= set(allowed) and candidate != skip
        skip = candidate
    assert perturb(frozenset({1}), [1], rng) == {1}


def test_layerskip_refuses_a_target_without_layer_skipping():
    fallback = tiny_engine("llama", native=False)
    with pytest.raises(InvalidRequestError, match="needs the native forward"):
        fallback.with_drafter("layerskip")


def test_layerskip_search_tries_candidates_and_keeps_its_skip_set_across_requests():
    hf_model = tiny_hf_model("llama", num_hidden_layers=6)
    engine = Engine(LoadedModel("tiny-6-layers", CharTokenizer(), hf_model, NativeCausalLM(hf_model)))
    drafter = create_drafter("layerskip", DrafterSetup(engine.loaded.target, engine.tokenizer,
                                                       {"interval": 2, "trial_steps": 2, "seed": 1}))
    assert isinstance(drafter, LayerSkipDrafter)
    speculative = Engine(engine.loaded, drafter, draft_budget=6)
    speculative.eos_token_ids = engine.eos_token_ids = frozenset()
    tried: set[frozenset[int]] = set()
    original = drafter._choose_skip_set

    def spy():
        chosen = original()
        tried.add(chosen)
        return chosen

    drafter._choose_skip_set = spy
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    got = speculative.generate_ids(prompt, 60)
    assert got.token_ids == engine.generate_ids(prompt, 60).token_ids
    assert len(tried) > 1  # candidates were tried
    assert drafter.skip in tried and drafter.score is not None  # learnt state survives end()
    assert drafter._trial is None
    again = speculative.generate_ids(prompt, 20)
    assert again.token_ids == got.token_ids[:20]


def test_layerskip_keeps_the_target_distribution_when_sampling():
    """Four sampled tokens, joint of tokens 2 and 3 (as for xvocab), drafted by the target itself with a
    layer skipped: draft_probs are recorded, so rejection sampling uses real ratios p/q."""
    vocab = 8
    hf_model = tiny_hf_model("llama", seed=3, vocab_size=vocab)
    hf_model.lm_head.weight.data /= 4.0
    chars = CharLevelTokenizer("abcdefg")
    plain = Engine(LoadedModel("tiny", chars, hf_model, NativeCausalLM(hf_model)))
    engine = plain.with_drafter("layerskip", {"threshold": 0.0}, draft_budget=2)
    engine.eos_token_ids = frozenset()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    runs = 600
    counts = np.zeros(vocab * vocab)
    drafted = accepted = 0
    for seed in range(runs):
        result = engine.generate_ids(prompt, 4, SamplingParams(temperature=1.0, seed=seed))
        counts[result.token_ids[1] * vocab + result.token_ids[2]] += 1
        drafted += result.stats.drafted_tokens
        accepted += result.stats.accepted_tokens
    assert drafted > 0 and accepted > 0  # drafts were verified, so the test can see a verifier's bias
    expected = _marginal_of_tokens_two_and_three(hf_model, prompt, vocab)
    assert chi_square_pvalue(counts, expected) > 1e-4


@pytest.mark.parametrize("name", ["ngram", "suffix", "recycle", "lookahead", "layerskip", "auto", "draft", "xvocab"])
def test_an_unknown_drafter_option_is_named_with_the_accepted_ones(name):
    with pytest.raises(InvalidRequestError, match=r"has no option 'bogus'; its options are: \w"):
        char_target().with_drafter(name, {"bogus": 1})


@pytest.mark.parametrize(("name", "options", "shown"), [
    ("suffix", {"max_depth": "deep"}, "'deep'"),
    ("ngram", {"min_ngram": 4, "max_ngram": 2}, "min_ngram <= max_ngram"),
    ("layerskip", {"skip": 1.5}, "'skip': 1.5"),
    ("auto", {"smoothing": "fast"}, "'fast'"),
])
def test_a_drafter_option_value_its_constructor_rejects_is_an_invalid_request(name, options, shown):
    with pytest.raises(InvalidRequestError, match=f"invalid option value for the {name} drafter .*{shown}"):
        char_target().with_drafter(name, options)
