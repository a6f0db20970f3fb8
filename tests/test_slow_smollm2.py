"""End-to-end checks on the real embedded model (SmolLM2-135M-Instruct, float32)."""

import os
import subprocess
import sys

import pytest
import torch

from quickdraft.devices import cpu_has_native_bf16
from quickdraft.drafters import available_drafters
from quickdraft.models.loading import load_model
from quickdraft.models.row_exact import attention_call as _attention_call
from quickdraft.tree import depths, matched_path, reordered
from quickdraft.types import DraftTree, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Summarize in one sentence: The museum will open a new wing in May. The wing holds two hundred paintings "
    "from the nineteenth century, and entry to it is free on Sundays.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Translate to French: The weather is nice today and we are going to the beach.",
]

#: Drafters that need another model; covered by their own slow tests.
NEEDS_OTHER_MODEL = {"draft", "xvocab"}


def test_native_forward_matches_transformers_on_smollm2(smollm2_fp32):
    engine = smollm2_fp32
    ids = engine.encode_prompt(PROMPTS[0])
    with torch.inference_mode():
        expected = engine.hf_model(torch.tensor([ids])).logits[0].float()
    session = engine.loaded.target.new_session(len(ids) + 8)
    session.prefill(ids[:-4])
    out = session.verify(ids[-4], DraftTree.chain(ids[-3:]))
    assert (out.logits - expected[-4:]).abs().max() < 2e-4


def attention_rows_are_independent(dtype: torch.dtype, rows: int = 60, keys: int = 320) -> bool:
    """Whether this CPU's attention kernel, called as the native forward calls it (``_attention_call``), gives
    a query row the same bits whatever the number of query rows in the call, up to ``rows``. Session 13
    measured rows independent below 64 on the AMX Xeon; on a 2-core AVX2 EPYC, float32 rows differ from 3 on."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 64, generator=generator).to(dtype) for n in (rows, keys, keys))
    mask = torch.zeros(1, 1, rows, keys, dtype=dtype)
    first_rows = [_attention_call(q[:, :, :count], k, v, mask[:, :, :count], False)[:, :, 0]
                  for count in range(1, rows + 1)]
    return all(torch.equal(row, first_rows[0]) for row in first_rows[1:])


#: Largest difference allowed between a verification row's logits and one-token decoding's where the CPU's
#: kernels are not row-invariant. float32: they agree to 4 decimals on a 2-core AVX2 EPYC. bfloat16 without
#: native support (linears through ``F.linear``): differences of about 0.5 in the final logits were measured
#: on an AVX-512 EPYC (shared/FACTS.md). Greedy speculation can then take another token than plain decoding only
#: where the top two logits are closer than twice this bound.
ROW_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1.0}


def rows_are_bit_exact_here(dtype: torch.dtype) -> bool:
    """Whether this CPU's kernels promise row-exact verification in ``dtype`` (the README's guarantee):
    attention rows independent of the call's row count, and in bfloat16 natively computed (prepacked)
    linears."""
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return False
    return attention_rows_are_independent(dtype)


def assert_row_matches_one_token_decoding(row: torch.Tensor, decoded: torch.Tensor, exact: bool,
                                          dtype: torch.dtype, where: tuple) -> None:
    """``row [V]`` of a verification forward against ``decoded [V]``, the logits one-token decoding gave at
    the same position: bit for bit where the kernels are row-exact, otherwise within :data:`ROW_TOLERANCE`."""
    if exact:
        assert torch.equal(row, decoded), where
        return
    difference = float((row - decoded).abs().max())
    assert difference < ROW_TOLERANCE[dtype], (where, difference)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verification_rows_match_one_token_decoding(smollm2_fp32, dtype):
    """The native forward is row-exact (quickdraft.models.native) where the CPU's kernels allow it: a 40-token
    chain, and the first-child path of a breadth-first tree with decoy siblings, give the logits one-token
    decoding gives, bit for bit. On CPUs whose kernels are not row-invariant (float32 attention on AVX2;
    bfloat16 without native support) the rows must still agree within a stated tolerance (see
    :func:`assert_row_matches_one_token_decoding`), and ``test_greedy_identity_on_real_prompts`` checks that
    the answers of every drafter equal plain decoding's on every CPU."""
    torch_dtype = getattr(torch, dtype)
    exact = rows_are_bit_exact_here(torch_dtype)
    model = smollm2_fp32.loaded.target if dtype == "float32" else load_model(dtype=dtype, weights="dense").target
    ids = smollm2_fp32.encode_prompt(PROMPTS[1])
    session = model.new_session(len(ids) + 96)
    decoded, step_logits = [], [session.prefill(ids)]
    for _ in range(72):
        decoded.append(int(step_logits[-1].argmax()))
        step_logits.append(session.extend(decoded[-1:]))
    for first in range(3, 30, 3):
        chain = DraftTree.chain(decoded[first:first + 40])
        decoys = [[token + 1] for token in decoded[first:first + 6]]
        first_children = DraftTree.from_paths([decoded[first:first + 6]] + decoys)
        breadth_first = reordered(first_children, sorted(range(first_children.size),
                                                         key=lambda node: (int(depths(first_children)[node]), node)))
        for tree, length in ((chain, 40), (breadth_first, 6)):
            session.truncate(len(ids) + first - 1)
            out = session.verify(decoded[first - 1], tree)
            path = matched_path(tree, decoded[first:first + length])
            assert len(path) == length
            for depth, row in enumerate([0] + [node + 1 for node in path]):
                assert_row_matches_one_token_decoding(out.logits[row], step_logits[first + depth], exact,
                                                      torch_dtype, (first, tree.size, depth))


def test_the_row_check_fails_for_rows_that_differ_more_than_promised():
    """The row test's assertion has power in both of its modes."""
    decoded = torch.tensor([0.0, 5.0, 4.99995, 1.0])
    assert_row_matches_one_token_decoding(decoded + 1e-5, decoded, False, torch.float32, ())
    for row, exact, dtype in ((decoded + 1e-5, True, torch.float32), (decoded + 0.01, False, torch.float32),
                              (decoded + 2.0, False, torch.bfloat16)):
        with pytest.raises(AssertionError):
            assert_row_matches_one_token_decoding(row, decoded, exact, dtype, ())


@pytest.mark.parametrize("drafter", [d for d in available_drafters()
                                     if d not in NEEDS_OTHER_MODEL and not d.startswith("test-")])
def test_greedy_identity_on_real_prompts(smollm2_fp32, drafter):
    assert_greedy_identity(smollm2_fp32, drafter)


def assert_greedy_identity(plain, drafter: str, new_tokens: int = 48) -> None:
    """``drafter`` on ``plain``'s target writes, on every prompt of :data:`PROMPTS`, the tokens ``plain`` writes."""
    speculative = plain.with_drafter(drafter)
    for prompt in PROMPTS:
        ids = plain.encode_prompt(prompt)
        expected = plain.generate_ids(ids, new_tokens).token_ids
        got = speculative.generate_ids(ids, new_tokens)
        assert got.token_ids == expected, f"{drafter} diverged on {prompt[:30]!r}"


def test_draft_model_drafter_with_the_model_itself_accepts_everything(smollm2_fp32):
    """The target as its own draft model: every draft token must be accepted (tau = budget + 1)."""
    engine = smollm2_fp32.with_drafter("draft", {"model": smollm2_fp32.loaded.target}, draft_budget=4)
    ids = engine.encode_prompt(PROMPTS[1])
    result = engine.generate_ids(ids, 41)
    assert result.token_ids == smollm2_fp32.generate_ids(ids, 41).token_ids
    assert result.stats.tau > 4.5


def test_sampling_with_seed_is_reproducible_and_differs_across_seeds(smollm2_fp32):
    engine = smollm2_fp32.with_drafter("suffix")
    ids = engine.encode_prompt(PROMPTS[2])
    first = engine.generate_ids(ids, 24, SamplingParams(temperature=0.8, seed=3)).token_ids
    assert engine.generate_ids(ids, 24, SamplingParams(temperature=0.8, seed=3)).token_ids == first
    others = {tuple(engine.generate_ids(ids, 24, SamplingParams(temperature=0.8, seed=s)).token_ids)
              for s in range(4, 8)}
    assert len(others | {tuple(first)}) > 1


def test_the_gguf_loads_as_dense_weights_in_bfloat16():
    """transformers 5.24+ may keep GGUF weights packed; the native forward needs (and asks for) dense ones."""
    from quickdraft.models.loading import load_model
    from quickdraft.models.native import NativeCausalLM

    loaded = load_model(dtype="bfloat16", weights="dense")
    assert isinstance(loaded.target, NativeCausalLM)
    linears = [module for name, module in loaded.hf_model.named_modules() if name.endswith(("_proj", "lm_head"))]
    assert len(linears) == 30 * 7 + 1
    for module in linears:
        assert type(module) is torch.nn.Linear
        assert module.weight.dtype == torch.bfloat16
        assert module.weight.shape == (module.out_features, module.in_features)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quickdraft.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_streams_and_prints_statistics():
    done = run_cli("generate", "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--drafter", "ngram",
                   "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) > 10
    assert "tok/s" in done.stderr and "tau" in done.stderr and "drafter ngram" in done.stderr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_demo_compares_plain_and_speculative_decoding(dtype):
    """`make demo`'s command. In float32 every answer must match plain decoding (exit status 1 otherwise); in
    bfloat16 a mismatch is explained, not reported as a bug."""
    done = run_cli("demo", "--dtype", dtype, "--max-new-tokens", "32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"embedded model, {dtype}, 3 prompts" in done.stdout
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 4}
    assert set(rows) == {"ar", "suffix", "auto"}
    if dtype == "float32":
        assert "3/3" in rows["suffix"] and "3/3" in rows["auto"]
    elif "3/3" not in rows["suffix"] or "3/3" not in rows["auto"]:
        assert "near-tie" in done.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "--prompt", ""], "prompt is empty"),
        (["generate", "--prompt", "hi", "--drafter", "nope"], "unknown drafter"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "hi", "--temperature", "nan"], "finite"),
        (["generate", "--prompt", "hi", "--top-p", "2"], "top_p"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "--prompt", "hi", "--model", "/does/not/exist"], "does not exist"),
        (["generate", "--prompt", "x " * 9000, "--max-new-tokens", "4"], "context is 8192"),
    ],
)
def test_cli_bad_input_is_a_clear_error_without_traceback(args, fragment):
    done = run_cli(*args)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_index_builds_a_datastore_and_rejects_bad_corpora(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The cat sat on the mat. The cat sat on the hat.\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02binary")
    store = tmp_path / "store.npz"
    done = run_cli("index", str(corpus), "-o", str(store))
    assert done.returncode == 0, done.stderr
    assert store.is_file() and f"--datastore {store}" in done.stderr
    done = run_cli("generate", "--prompt", "Repeat: The cat sat on the mat.", "--max-new-tokens", "12",
                   "--drafter", "suffix", "--datastore", str(store), "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "drafter suffix" in done.stderr
    for bad, fragment in ((empty, "is empty"), (binary, "binary"), (tmp_path / "missing.txt", "does not exist")):
        done = run_cli("index", str(bad), "-o", str(tmp_path / "x.npz"))
        assert done.returncode == 2 and fragment in done.stderr and "Traceback" not in done.stderr


def test_cli_generate_loads_from_the_cache_quietly_the_second_time(tmp_path):
    """The first load of the embedded GGUF converts it and says so; a second process reads the cache (no
    GGUF parse, no message, no progress bar) and writes the same text. Uses a private cache folder."""
    env = {**os.environ, "QUICKDRAFT_CACHE": str(tmp_path / "cache")}
    args = ["generate", "--prompt", PROMPTS[1], "--max-new-tokens", "16", "--dtype", "float32"]
    runs = [subprocess.run([sys.executable, "-m", "quickdraft.cli", *args], capture_output=True, text=True,
                           timeout=600, env=env) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr + runs[1].stderr
    assert "caching it" in runs[0].stderr and "caching it" not in runs[1].stderr
    assert "Converting" not in runs[1].stderr and "Loading weights" not in runs[1].stderr
    assert runs[0].stdout == runs[1].stdout
    assert "drafter auto" in runs[1].stderr
    listed = subprocess.run([sys.executable, "-m", "quickdraft.cli", "cache", "ls"], capture_output=True,
                            text=True, timeout=600, env=env).stdout
    assert "model" in listed and "cost-curve" in listed and "float32 dense" in listed
