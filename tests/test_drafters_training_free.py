"""Unit tests of the training-free drafters (suffix, recycle, lookahead) with a fake target; no model needed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from quickdraft.drafters import _BUILTIN_MODULES, _REGISTRY
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.drafters.datastore import (
    SEPARATOR,
    SuffixAutomaton,
    advance,
    build_datastore,
    index_corpus,
    load_datastore,
)
from quickdraft.drafters.lookahead import LookaheadDrafter
from quickdraft.drafters.recycle import RecycleDrafter, default_template
from quickdraft.drafters.suffix import LONG_MATCH, SuffixDrafter
from quickdraft.errors import InvalidRequestError
from quickdraft.types import DraftTree, SamplingParams
from quickdraft.verify import verify_greedy

VOCAB = 16


class FakeTarget:
    """A deterministic toy LM whose logits depend on the last two tokens of the prefix."""

    def __init__(self, vocab: int = VOCAB, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.table = torch.randn(vocab, vocab, vocab, generator=gen)

    def row(self, prefix: list[int]) -> torch.Tensor:
        a = prefix[-2] if len(prefix) > 1 else 0
        return self.table[a, prefix[-1]]

    def logits(self, tokens: list[int], tree: DraftTree) -> torch.Tensor:
        """Rows as the verifier expects: row 0 after the root, row i + 1 after node i."""
        prefixes = [list(tokens)]
        for token, parent in zip(tree.tokens.tolist(), tree.parents.tolist()):
            prefixes.append(prefixes[parent + 1] + [token])
        return torch.stack([self.row(p) for p in prefixes])

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        tokens = list(prompt)
        for _ in range(steps):
            tokens.append(int(self.row(tokens).argmax()))
        return tokens


def make_ctx(tokens: list[int]) -> DraftContext:
    return DraftContext(tokens=list(tokens), prompt_len=len(tokens), params=SamplingParams())


def run_steps(drafter: Drafter, target: FakeTarget, prompt: list[int], steps: int, budget=8, check=None):
    """The engine's greedy step protocol (begin, then the first token from the prefill logits without an
    observe, then propose/verify/observe); returns the context and the number of accepted draft tokens."""
    ctx = make_ctx(prompt)
    drafter.begin(ctx)
    ctx.tokens.append(int(target.row(ctx.tokens).argmax()))
    accepted = 0
    rng = random.Random(1)
    for _ in range(steps):
        b = budget if isinstance(budget, int) else rng.choice(budget)
        tree = drafter.propose(ctx, b)
        if check is not None:
            check(tree, b)
        logits = target.logits(ctx.tokens, tree)
        result = verify_greedy(tree, logits)
        ctx.tokens.extend(result.tokens)
        accepted += result.num_accepted
        drafter.observe(ctx, StepOutcome(tree, result, logits=logits))
    drafter.end()
    return ctx, accepted


def assert_valid(tree: DraftTree, budget: int) -> None:
    assert tree.size <= max(budget, 0)
    assert tree.tokens.dtype == torch.long and tree.parents.dtype == torch.long
    assert tree.draft_probs is None
    seen = set()
    for i, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        assert -1 <= parent < i
        assert token >= 0
        assert (parent, token) not in seen, "duplicate siblings"
        seen.add((parent, token))


def brute_longest_earlier_suffix(tokens: list[int]) -> int:
    """Length of the longest suffix of tokens that also ends at an earlier position."""
    n = len(tokens)
    for length in range(n - 1, 0, -1):
        suffix = tokens[n - length :]
        for end in range(length - 1, n - 1):
            if tokens[end - length + 1 : end + 1] == suffix:
                return length
    return 0


def all_drafters() -> list[Drafter]:
    return [SuffixDrafter(), RecycleDrafter(vocab_size=VOCAB), LookaheadDrafter()]


# -- registry --


def test_drafters_are_registered():
    for name, cls in [("suffix", SuffixDrafter), ("recycle", RecycleDrafter), ("lookahead", LookaheadDrafter)]:
        assert _REGISTRY[name] is cls
        assert f"quickdraft.drafters.{name}" in _BUILTIN_MODULES
    assert "quickdraft.drafters.ngram" in _BUILTIN_MODULES
    assert RecycleDrafter.needs == {"target_logits"} and LookaheadDrafter.needs == {"target_logits"}


# -- suffix automaton --


def test_automaton_anchor_is_longest_earlier_match():
    rng = random.Random(0)
    for _ in range(40):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        sam = SuffixAutomaton()
        for n, token in enumerate(tokens, start=1):
            sam.extend(token)
            length = brute_longest_earlier_suffix(tokens[:n])
            assert sam.anchor_length == length
            if length:
                pos = sam.anchor_pos
                assert pos < n - 1
                assert tokens[pos - length + 1 : pos + 1] == tokens[n - length : n]
        assert sam.num_states <= max(2 * len(tokens) - 1, 2)


def test_automaton_accepts_exactly_the_substrings():
    rng = random.Random(1)
    tokens = [rng.randrange(3) for _ in range(30)]
    sam = SuffixAutomaton()
    sam.extend_all(tokens)
    substrings = {tuple(tokens[i:j]) for i in range(30) for j in range(i + 1, 31)}
    for length in range(1, 6):
        for probe in {tuple(rng.randrange(3) for _ in range(length)) for _ in range(60)}:
            state = 0
            for t in probe:
                state = sam.transition(state, t)
                if state < 0:
                    break
            assert (state >= 0) == (probe in substrings)


def test_endpos_prefers_most_recent_occurrence():
    sam = SuffixAutomaton()
    sam.extend_all([1, 2, 7, 1, 2, 8, 1, 2])
    assert sam.anchor_length == 2
    assert sam.continuation(sam.anchor_pos, 3) == [8, 1, 2]


def test_incremental_build_equals_from_scratch():
    rng = random.Random(2)
    target = FakeTarget(vocab=4, seed=3)
    for _ in range(5):
        drafter = SuffixDrafter()
        prompt = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        ctx = make_ctx(prompt)
        drafter.begin(ctx)
        for _ in range(15):
            tree = drafter.propose(ctx, 6)
            logits = target.logits(ctx.tokens, tree)
            result = verify_greedy(tree, logits)
            ctx.tokens.extend(result.tokens)
            drafter.observe(ctx, StepOutcome(tree, result, logits=logits))
        scratch = SuffixAutomaton()
        scratch.extend_all(ctx.tokens)
        live = drafter._sam
        assert live is not None
        for attr in ("next", "link", "length", "endpos", "tokens", "last", "anchor", "anchor_pos"):
            assert getattr(live, attr) == getattr(scratch, attr), attr
        drafter.end()
        assert drafter._sam is None


def test_suffix_proposes_continuation_of_longest_match():
    drafter = SuffixDrafter(max_depth=4)
    ctx = make_ctx([5, 1, 2, 3, 4, 9, 9, 2, 3, 4, 6, 1, 2, 3])
    drafter.begin(ctx)
    assert drafter.evidence(ctx) == 3
    tree = drafter.propose(ctx, 4)
    assert tree.is_chain()
    assert tree.tokens.tolist() == [4, 9, 9, 2]  # "1 2 3" matched, not the shorter "2 3"


def test_suffix_evidence_is_the_match_length_capped():
    drafter = SuffixDrafter()
    ctx = make_ctx([4, 5, 6])
    drafter.begin(ctx)
    assert drafter.evidence(ctx) == 0
    ctx.tokens.extend(list(range(20, 40)) + list(range(20, 40)))
    assert drafter.evidence(ctx) == LONG_MATCH


def test_suffix_branches_when_continuations_differ():
    drafter = SuffixDrafter(max_depth=3, branch_depth=2)
    ctx = make_ctx([1, 2, 7, 3, 1, 2, 8, 4, 1, 2])
    drafter.begin(ctx)
    tree = drafter.propose(ctx, 8)
    assert_valid(tree, 8)
    assert tree.first_chain().tokens.tolist() == [8, 4, 1]  # most recent occurrence first
    root_children = [t for t, p in zip(tree.tokens.tolist(), tree.parents.tolist()) if p == -1]
    assert root_children == [8, 7]
    assert drafter.propose(ctx, 1).tokens.tolist() == [8]


def test_suffix_edge_cases():
    drafter = SuffixDrafter()
    ctx = make_ctx([7])
    drafter.begin(ctx)
    assert drafter.propose(ctx, 8).size == 0
    ctx.tokens.extend([7, 7])
    assert drafter.propose(ctx, 0).size == 0
    assert drafter.propose(ctx, 3).tokens.tolist() == [7]
    with pytest.raises(InvalidRequestError):
        SuffixDrafter(max_depth=0)


# -- validity, losslessness of the protocol, all drafters --


@pytest.mark.parametrize("make", [SuffixDrafter, lambda: RecycleDrafter(vocab_size=VOCAB), LookaheadDrafter])
def test_trees_valid_on_random_streams(make):
    rng = random.Random(4)
    for trial in range(12):
        target = FakeTarget(seed=trial)
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
        ctx, _ = run_steps(make(), target, prompt, steps=20, budget=[0, 1, 2, 3, 5, 8, 13, 64], check=assert_valid)
        assert ctx.tokens[: len(prompt) + 20] == target.greedy(prompt, 20)[: len(prompt) + 20]


def test_drafters_accept_tokens_on_repetitive_target():
    target = FakeTarget(seed=5)
    prompt = target.greedy([3], 40)
    for drafter in all_drafters():
        ctx, accepted = run_steps(drafter, target, prompt, steps=10, budget=16)
        assert ctx.tokens[: len(prompt) + 10] == target.greedy(prompt, 10)
        assert accepted >= 10, type(drafter).__name__


def test_unseen_tokens_give_valid_trees():
    for drafter in all_drafters():
        ctx = make_ctx([VOCAB + 50])
        drafter.begin(ctx)
        tree = drafter.propose(ctx, 8)
        assert_valid(tree, 8)
        drafter.end()


# -- recycle --


def test_recycle_observe_updates_matrix_from_logits():
    drafter = RecycleDrafter(topk=3, vocab_size=10)
    ctx = make_ctx([4, 5])
    drafter.begin(ctx)
    tree = DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    logits = torch.zeros(3, 10)
    logits[0, [9, 8, 7]] = torch.tensor([3.0, 2.0, 1.0])  # after the root (5)
    logits[1, [0, 1, 2]] = torch.tensor([1.0, 3.0, 2.0])  # after node 0 (1)
    logits[2, [6, 3, 4]] = torch.tensor([3.0, 2.0, 1.0])  # after node 1 (2)
    result = verify_greedy(tree, logits)
    ctx.tokens.extend(result.tokens)
    drafter.observe(ctx, StepOutcome(tree, result, logits=logits))
    assert drafter.candidates(5) == [9, 8, 7]
    assert drafter.candidates(1) == [1, 2, 0]
    assert drafter.candidates(2) == [6, 3, 4]
    assert drafter.candidates(3) == []


def test_recycle_seeds_bigrams_and_expands_template():
    drafter = RecycleDrafter(topk=2, template=[(-1, 0), (-1, 1), (0, 0), (1, 0), (2, 1)])
    ctx = make_ctx([1, 2, 3, 1, 4])
    drafter.begin(ctx)
    assert drafter.candidates(1) == [2, 4]
    tree = drafter.expand(1, 10)
    # root 1 -> 2, 4; 2 -> 3; 4 unknown (skipped); 3 has one candidate only (rank 1 unknown)
    assert tree.tokens.tolist() == [2, 4, 3]
    assert tree.parents.tolist() == [-1, -1, 0]
    assert drafter.expand(1, 2).tokens.tolist() == [2, 4]
    assert drafter.propose(ctx, 0).size == 0
    assert drafter.propose(ctx, 5).tokens.tolist() == []  # root 4 never seen followed by anything


def test_recycle_grows_matrix_lazily():
    drafter = RecycleDrafter(topk=2)
    assert drafter.matrix is None
    drafter.update([3], torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0]]))
    assert drafter.matrix is not None and drafter.matrix.shape == (5, 2)
    drafter.seed_bigrams([7, 1])
    assert drafter.matrix.shape == (8, 2) and drafter.candidates(7) == [1]
    drafter.update([0], torch.tensor([[1.0]]))  # vocabulary smaller than topk
    assert drafter.candidates(0) == [0]


def test_default_template_is_wide_near_root_and_prefix_closed():
    template = default_template()
    assert len(template) == 64
    depth = []
    for i, (parent, rank) in enumerate(template):
        assert -1 <= parent < i and 0 <= rank < 8
        depth.append(1 if parent < 0 else depth[parent] + 1)
    assert sum(1 for p, _ in template if p == -1) == 8
    assert max(depth) <= 6
    assert template[0] == (-1, 0) and template[1] == (0, 0)
    with pytest.raises(InvalidRequestError):
        RecycleDrafter(template=[(0, 0)])


def test_recycle_save_load_round_trip(tmp_path):
    target = FakeTarget(seed=6)
    drafter = RecycleDrafter(vocab_size=VOCAB)
    run_steps(drafter, target, target.greedy([1], 10), steps=5)
    path = tmp_path / "recycle.safetensors"
    drafter.save(path)
    restored = RecycleDrafter()
    restored.load(path)
    assert np.array_equal(restored.matrix, drafter.matrix)
    by_option = RecycleDrafter(state_path=str(path))
    assert np.array_equal(by_option.matrix, drafter.matrix)
    by_option.matrix[0, 0] = 3
    by_option.end()  # writes state_path back
    assert RecycleDrafter(state_path=str(path)).matrix[0, 0] == 3
    with pytest.raises(InvalidRequestError):
        RecycleDrafter(topk=4).load(path)


def test_recycle_from_setup_reads_vocab_size():
    class Target:
        vocab_size = 33

    drafter = RecycleDrafter.from_setup(DrafterSetup(target=Target(), tokenizer=None, options={"topk": "4"}))
    assert drafter.matrix is not None and drafter.matrix.shape == (33, 4)


# -- lookahead --


def test_lookahead_pool_harvest_most_recent_first_and_bounded():
    drafter = LookaheadDrafter(ngram=3, pool_size=2, max_candidates=2, window=2)
    ctx = make_ctx([1, 2, 3, 1, 4, 5, 1, 2, 3, 1, 6, 7, 1])
    drafter.begin(ctx)
    assert drafter.pool[1] == [(6, 7), (2, 3)]  # (4, 5) pushed out; (2, 3) refreshed
    assert drafter.pool[2] == [(3, 1)]
    tree = drafter.propose(ctx, 16)
    assert_valid(tree, 16)
    assert tree.tokens.tolist()[:4] == [6, 7, 2, 3]  # the pool's continuations of the root (1), newest first
    assert tree.parents.tolist()[:4] == [-1, 0, -1, 2]
    assert len(drafter._proposed_lane) >= 1 and tree.size <= 4 + 2  # plus the Jacobi lane (window 2)
    assert drafter.propose(ctx, 3).tokens.tolist() == [6, 7, 2]  # pool first when the budget is small


def test_lookahead_observe_harvests_new_tokens_incrementally():
    drafter = LookaheadDrafter(ngram=3)
    ctx = make_ctx([1, 2])
    drafter.begin(ctx)
    assert drafter.pool == {}
    tree = DraftTree.empty()
    logits = torch.zeros(1, 10)
    logits[0, 3] = 1.0
    result = verify_greedy(tree, logits)
    ctx.tokens.extend(result.tokens)
    drafter.observe(ctx, StepOutcome(tree, result, logits=logits))
    assert drafter.pool[1] == [(2, 3)]


class PositionTarget(FakeTarget):
    """A toy LM whose next token depends only on the position, so Jacobi iteration converges in one step."""

    def __init__(self, length: int = 64, seed: int = 0) -> None:
        super().__init__(seed=seed)
        gen = torch.Generator().manual_seed(seed)
        self.sequence = torch.randint(0, VOCAB, (length,), generator=gen).tolist()

    def row(self, prefix: list[int]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(self.sequence[len(prefix)]), VOCAB).float()


def test_lookahead_jacobi_lane_follows_target_argmax():
    target = PositionTarget(seed=7)
    drafter = LookaheadDrafter(window=4, max_candidates=0)  # the lane only
    ctx = make_ctx(target.sequence[:3])
    drafter.begin(ctx)
    tree = drafter.propose(ctx, 4)
    assert tree.is_chain() and tree.size == 4 and drafter._proposed_lane == drafter.lane
    logits = target.logits(ctx.tokens, tree)
    result = verify_greedy(tree, logits)
    ctx.tokens.extend(result.tokens)
    drafter.observe(ctx, StepOutcome(tree, result, logits=logits))
    n = len(ctx.tokens)
    refined = min(5 - len(result.tokens), 4)  # the iterate covers 5 positions; the committed ones shift out
    # one Jacobi iteration: every refined lane position now holds the target's argmax for it
    assert drafter.lane[:refined] == target.sequence[n : n + refined]
    tree = drafter.propose(ctx, 4)
    result = verify_greedy(tree, target.logits(ctx.tokens, tree))
    assert result.num_accepted >= refined
    assert drafter.pool  # n-grams harvested from the lane iterate


def test_lookahead_lane_shift_without_logits():
    drafter = LookaheadDrafter(window=4, max_candidates=0)
    ctx = make_ctx([1, 2, 3])
    drafter.begin(ctx)
    drafter.lane = [4, 5, 6, 7]
    tree = drafter.propose(ctx, 4)
    assert tree.tokens.tolist() == [4, 5, 6, 7]
    result = verify_greedy(tree, torch.eye(10)[[4, 9, 0, 0, 0]])  # accepts 4; bonus 9
    ctx.tokens.extend(result.tokens)
    drafter.observe(ctx, StepOutcome(tree, result, logits=None))
    assert len(drafter.lane) == 4 and drafter.lane[:2] == [6, 7]  # shifted by the 2 committed tokens
    with pytest.raises(InvalidRequestError):
        LookaheadDrafter(ngram=1)


def test_lookahead_lane_realigns_after_token_committed_without_observe():
    drafter = LookaheadDrafter(window=3, max_candidates=0)
    ctx = make_ctx([1, 2, 3])
    drafter.begin(ctx)
    drafter.lane = [4, 5, 6]
    ctx.tokens.append(4)  # the engine's first token comes from the prefill, with no observe
    assert drafter.propose(ctx, 3).tokens.tolist()[:2] == [5, 6]


# -- the static datastore --


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 97 for c in text]


class KwargTokenizer:
    def __init__(self) -> None:
        self.kwargs: dict = {}

    def encode(self, text: str, **kwargs) -> list[int]:
        self.kwargs = kwargs
        return [1] + [ord(c) % 97 for c in text]  # a BOS when special tokens are on


def test_datastore_build_save_load(tmp_path):
    docs = [[1, 2, 3, 4, 5], [9, 1, 2, 3, 8], [7, 7]]
    path = tmp_path / "store.bin"  # any name: written exactly there
    stats = build_datastore(docs, path)
    assert stats["tokens"] == 12 and stats["documents"] == 3 and path.is_file()
    store = load_datastore(path)
    dynamic = SuffixAutomaton()
    dynamic.extend_all([1, 2, 3, 4, 5, SEPARATOR, 9, 1, 2, 3, 8, SEPARATOR, 7, 7])
    assert store.num_states == dynamic.num_states and store.num_tokens == 14
    for s in range(dynamic.num_states):
        assert sorted(store.edges(s)) == sorted(dynamic.edges(s))
        assert store.link_of(s) == dynamic.link[s] and store.length_of(s) == dynamic.length[s]
    state, length = 0, 0
    for token in [6, 1, 2, 3]:
        state, length = advance(store, state, length, token)
    assert length == 3
    assert store.continuation(store.endpos_of(state), 5) in ([4, 5], [8])  # stops at the separator


def test_suffix_drafter_uses_datastore(tmp_path):
    path = tmp_path / "store.npz"
    build_datastore([[10, 11, 12, 13, 14, 15], [20, 21]], path)
    drafter = SuffixDrafter(datastore=str(path), max_depth=8)
    ctx = make_ctx([3, 4, 11, 12])
    drafter.begin(ctx)
    tree = drafter.propose(ctx, 8)
    assert tree.first_chain().tokens.tolist() == [13, 14, 15]
    ctx.tokens.extend([13, 3, 4])  # now the request's own history matches longer ("3 4") than the corpus
    tree = drafter.propose(ctx, 8)
    assert_valid(tree, 8)
    assert tree.first_chain().tokens.tolist()[:3] == [11, 12, 13]
    drafter.end()
    with pytest.raises(InvalidRequestError):
        SuffixDrafter(datastore=str(tmp_path / "missing.npz"))


def test_index_corpus_and_errors(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("hello world\n", encoding="utf-8")
    other = tmp_path / "b.txt"
    other.write_text("héllo again", encoding="utf-8")
    out = tmp_path / "idx.npz"
    stats = index_corpus([str(good), str(other)], FakeTokenizer(), str(out))
    assert stats["files"] == 2 and stats["tokens"] == len("hello world\n") + len("héllo again")
    assert load_datastore(out).num_tokens == stats["tokens"] + 1
    tok = KwargTokenizer()
    index_corpus([str(good)], tok, str(out))
    assert tok.kwargs == {"add_special_tokens": False}

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\x00\x01\x02")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    cases = {
        str(tmp_path / "nope.txt"): "does not exist",
        str(empty): "empty",
        str(binary): "binary",
        str(latin): "not UTF-8",
    }
    for file, message in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            index_corpus([str(good), file], FakeTokenizer(), str(out))
    with pytest.raises(InvalidRequestError):
        index_corpus([], FakeTokenizer(), str(out))
    with pytest.raises(InvalidRequestError, match="folder does not exist"):
        index_corpus([str(good)], FakeTokenizer(), str(tmp_path / "no" / "idx.npz"))
    with pytest.raises(InvalidRequestError, match="over the datastore limit"):
        index_corpus([str(good)], FakeTokenizer(), str(out), max_tokens=3)


def test_load_datastore_rejects_other_files(tmp_path):
    bogus = tmp_path / "bogus.npz"
    bogus.write_text("not an archive")
    with pytest.raises(InvalidRequestError):
        load_datastore(bogus)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, something=np.zeros(3))
    with pytest.raises(InvalidRequestError):
        load_datastore(wrong)
