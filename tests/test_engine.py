"""The engine loop: every drafter reproduces plain greedy decoding token for token (float32), and bad
requests get clear errors. That sampling keeps the target distribution end to end is checked in
test_sampling_end_to_end.py."""

import pytest

from quickdraft.drafters import available_drafters, register
from quickdraft.drafters.base import DraftContext, Drafter
from quickdraft.engine import Engine, check_prompt, eos_token_ids, plain_transcript
from quickdraft.errors import InvalidRequestError, UnknownDrafterError
from quickdraft.heads import new_head
from quickdraft.models.native import NativeCausalLM
from quickdraft.types import DraftTree, SamplingParams

from conftest import TINY_VOCAB, perturbed_copy, tiny_engine

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3],
    [40, 41, 42, 40, 41, 42, 43, 44, 40],
]

#: Options for drafters that need more than their defaults on a tiny model.
DRAFTER_OPTIONS = {
    "draft": lambda engine: {"model": NativeCausalLM(perturbed_copy(engine.hf_model))},
    # untrained heads: no shipped head fits a tiny model (trained ones: tests/test_heads.py)
    "eagle": lambda engine: {"head": untrained_head("eagle", engine)},
    "medusa": lambda engine: {"head": untrained_head("medusa", engine)},
}


def untrained_head(kind: str, engine: Engine):
    return new_head(kind, engine.loaded.target, engine.tokenizer, list(range(engine.loaded.target.vocab_size)))

#: Drafters that need resources a tiny random model cannot provide; tested on real models elsewhere.
NEEDS_REAL_MODELS = {"xvocab"}


def drafters_to_test() -> list[str]:
    return [name for name in available_drafters() if name not in NEEDS_REAL_MODELS and not name.startswith("test-")]


def with_drafter(engine: Engine, name: str, **kwargs) -> Engine:
    options = DRAFTER_OPTIONS[name](engine) if name in DRAFTER_OPTIONS else {}
    return engine.with_drafter(name, options, **kwargs)


@pytest.mark.parametrize("drafter", drafters_to_test())
def test_greedy_output_is_identical_to_plain_decoding(architecture, drafter):
    plain = tiny_engine(architecture)
    speculative = with_drafter(plain, drafter)
    accepted = 0
    for prompt in PROMPTS:
        expected = plain.generate_ids(prompt, 40)
        got = speculative.generate_ids(prompt, 40)
        assert got.token_ids == expected.token_ids, f"{drafter} diverged from plain decoding on {architecture}"
        assert got.finish_reason == expected.finish_reason
        assert expected.stats.tau == 1.0
        accepted += got.stats.accepted_tokens
    assert accepted > 0, f"{drafter} never had a draft token accepted; the identity test would be vacuous"


class OracleTreeDrafter(Drafter):
    """Test drafter: a tree whose best-looking branches are wrong and whose last branch holds the true
    continuation, so only correct tree masking and positions can get it accepted."""

    def __init__(self, truth: list[int], prompt_len: int, vocab: int) -> None:
        self.truth, self.prompt_len, self.vocab = truth, prompt_len, vocab

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        done = len(ctx.tokens) - self.prompt_len
        right = self.truth[done : done + 4]
        wrong = [[(t + 1) % self.vocab for t in right[:3]], [(t + 2) % self.vocab for t in right[:2]]]
        return DraftTree.from_paths([*wrong, right]) if right else DraftTree.empty()


def test_tree_verification_accepts_a_correct_branch_behind_wrong_ones(architecture):
    plain = tiny_engine(architecture)
    plain.eos_token_ids = frozenset()
    prompt = PROMPTS[1]
    truth = plain.generate_ids(prompt, 60).token_ids
    oracle = OracleTreeDrafter(truth, len(prompt), TINY_VOCAB)
    speculative = Engine(plain.loaded, oracle, draft_budget=16)
    speculative.eos_token_ids = frozenset()
    got = speculative.generate_ids(prompt, 60)
    assert got.token_ids == truth
    assert got.stats.tau > 3.0


def test_chain_only_fallback_reproduces_plain_decoding_with_a_tree_drafter():
    plain = tiny_engine("llama", native=False)
    truth = plain.generate_ids(PROMPTS[0], 20).token_ids
    oracle = OracleTreeDrafter(truth, len(PROMPTS[0]), TINY_VOCAB)
    got = Engine(plain.loaded, oracle, draft_budget=16).generate_ids(PROMPTS[0], 20)
    assert got.token_ids == truth


def test_native_and_fallback_plain_decoding_agree():
    native = tiny_engine("qwen2").generate_ids(PROMPTS[2], 30).token_ids
    fallback = tiny_engine("qwen2", native=False).generate_ids(PROMPTS[2], 30).token_ids
    assert native == fallback


def test_max_new_tokens_and_eos_are_respected():
    engine = with_drafter(tiny_engine("llama"), "ngram")
    assert len(engine.generate_ids(PROMPTS[0], 7).token_ids) == 7
    plain = tiny_engine("llama")
    first = plain.generate_ids(PROMPTS[0], 5).token_ids
    plain.eos_token_ids = frozenset({first[2]})
    result = plain.generate_ids(PROMPTS[0], 20)
    assert result.token_ids == first[:2] and result.finish_reason == "stop"


def test_stop_strings_cut_the_text_and_streaming_matches_generate():
    engine = with_drafter(tiny_engine("llama"), "ngram")
    engine.eos_token_ids = frozenset()
    full = engine.generate_ids(PROMPTS[1], 30)
    stop = full.text[10:13]
    assert len(stop) == 3
    cut = engine.generate_ids(PROMPTS[1], 30, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    run = engine.start(PROMPTS[1], 30)
    streamed = "".join(chunk.text for chunk in run.chunks())
    assert streamed == full.text == run.result().text


def test_seeded_sampling_is_reproducible():
    engine = with_drafter(tiny_engine("llama"), "draft")
    params = SamplingParams(temperature=0.9, seed=11)
    first = engine.generate_ids(PROMPTS[0], 20, params).token_ids
    assert engine.generate_ids(PROMPTS[0], 20, params).token_ids == first


#: Drafters whose sampled output is checked against the target's exact distribution here (layerskip and xvocab:
#: tests/test_drafters_model.py); the deterministic tree drafters in the slow group.
@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda e: e.generate("", max_new_tokens=4), InvalidRequestError, "prompt is empty"),
        (lambda e: e.generate("   ", max_new_tokens=4), InvalidRequestError, "prompt is empty"),
        (lambda e: e.generate_ids([], 4), InvalidRequestError, "prompt is empty"),
        (lambda e: e.generate_ids([1] * 600, 4), InvalidRequestError, "context is 512"),
        (lambda e: e.generate_ids([1, 2], 0), InvalidRequestError, "max_new_tokens must be an integer >= 1"),
        (lambda e: e.generate("hi", max_new_tokens=4, temperature=-1), InvalidRequestError, "temperature"),
        (lambda e: e.generate("hi", max_new_tokens=4, temperature=float("nan")), InvalidRequestError, "finite"),
        (lambda e: e.generate("hi", max_new_tokens=4, top_p=0), InvalidRequestError, "top_p"),
        (lambda e: e.generate("hi", max_new_tokens=4, top_p=1.01), InvalidRequestError, "top_p"),
        (lambda e: e.with_drafter("no-such-drafter"), UnknownDrafterError, "choose one of"),
        (lambda e: e.with_drafter("draft"), InvalidRequestError, "needs a draft model"),
        (lambda e: e.generate([], max_new_tokens=4), InvalidRequestError, "non-empty list"),
        (lambda e: e.generate([{"role": "user"}], max_new_tokens=4), InvalidRequestError, "string 'content'"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, fragment):
    with pytest.raises(error) as info:
        call(tiny_engine("llama"))
    assert fragment in str(info.value)


def test_chat_messages_on_a_model_without_a_chat_template_become_a_plain_transcript():
    engine = tiny_engine("llama")
    messages = [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "YO"},
                {"role": "user", "content": "AGAIN"}]
    assert engine.tokenizer.chat_template is None
    assert plain_transcript(messages) == "User: HI\n\nAssistant: YO\n\nUser: AGAIN\n\nAssistant:"
    assert engine.encode_prompt(messages) == engine.tokenizer(plain_transcript(messages))["input_ids"]
    assert len(engine.generate(messages, max_new_tokens=4).token_ids) == 4


def test_long_request_is_clamped_to_the_context():
    result = tiny_engine("llama").generate_ids([1] * 500, 100)
    assert len(result.token_ids) <= 12


def test_missing_model_path_is_a_clear_error():
    from quickdraft.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine.from_pretrained("/no/such/model")


@pytest.mark.parametrize(("arguments", "fragment"), [
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--drafter", "suffix", "--drafter-option", "depth=2"], "the suffix drafter has no option 'depth'"),
    (["--drafter", "no-such-drafter"], "unknown drafter 'no-such-drafter'"),
    (["--drafter", "ngram", "--datastore", "store.npz"], "the ngram drafter has no option 'datastore'"),
])
def test_generate_cli_checks_its_arguments_before_loading_the_model(arguments, fragment, capsys):
    from quickdraft.cli import main

    assert main(["generate", "--prompt", "hi", "--model", "/no/such/model", *arguments]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "does not exist" not in err


def test_a_plugin_drafter_registers_without_touching_the_engine():
    @register("test-repeat-last")
    class RepeatLast(Drafter):
        def propose(self, ctx, budget):
            return DraftTree.chain([ctx.tokens[-1]] * budget)

    plain = tiny_engine("llama")
    got = plain.with_drafter("test-repeat-last").generate_ids(PROMPTS[0], 20)
    assert got.token_ids == plain.generate_ids(PROMPTS[0], 20).token_ids
    assert got.stats.drafter == "test-repeat-last"


def test_a_drafter_that_raises_is_ended_and_the_request_goes_on_losslessly():
    @register("test-raising-engine")
    class RaisingLater(Drafter):
        """Drafts the last token again, then raises once the reply has a few tokens."""

        ended = 0

        def propose(self, ctx, budget):
            if len(ctx.generated) > 3:
                raise RuntimeError("drafter bug")
            return DraftTree.chain([ctx.tokens[-1]])

        def end(self):
            type(self).ended += 1

    plain = tiny_engine("llama")
    got = plain.with_drafter("test-raising-engine").generate_ids(PROMPTS[0], 20)
    assert got.token_ids == plain.generate_ids(PROMPTS[0], 20).token_ids
    assert RaisingLater.ended == 1  # ended when it raised, not again when the request ended


def test_start_returns_a_public_generation_handle():
    from quickdraft.engine import Generation

    engine = with_drafter(tiny_engine("llama"), "ngram")
    generation = engine.start(PROMPTS[0], 12)
    assert isinstance(generation, Generation)
    streamed = [t for chunk in generation.chunks() for t in chunk.token_ids]
    assert streamed == generation.result().token_ids == engine.generate_ids(PROMPTS[0], 12).token_ids


def test_check_prompt_is_the_one_empty_prompt_check():
    for empty, fragment in [("", "pass some text"), ("  \n", "pass some text"), ([], "pass at least one token")]:
        with pytest.raises(InvalidRequestError, match=f"the prompt is empty; {fragment}"):
            check_prompt(empty)
    check_prompt(" ", blank_is_empty=False)  # text continued as it is (the server's completions)
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        check_prompt("", blank_is_empty=False)
    check_prompt("hi")
    check_prompt([0])


def test_eos_token_ids_take_the_tokenizer_then_the_generation_config_each_once():
    class Config:
        eos_token_id = [7, 3, 7]

    class Model:
        generation_config = Config()

    class Tokenizer:
        eos_token_id = 3

    assert eos_token_ids(Tokenizer(), Model()) == [3, 7]
    Config.eos_token_id = 9
    assert eos_token_ids(Tokenizer()) == [3] and eos_token_ids(object(), Model()) == [9]
    Tokenizer.eos_token_id = None
    assert eos_token_ids(Tokenizer(), object()) == []
