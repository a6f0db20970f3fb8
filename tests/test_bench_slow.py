"""Slower bench checks: transformers peers on a tiny random model, and ``quickdraft bench`` end to end on the
embedded model with the built-in prompt set."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from quickdraft.bench.cli import add_bench_arguments, bench_main
from quickdraft.bench.runners import HFRunner
from quickdraft.types import SamplingParams

pytestmark = pytest.mark.slow


def test_bench_main_on_builtin_prompts_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args([
        "--per-category", "1", "--max-new-tokens", "16", "--methods", "ar,hf,ngram",
        "--warmup-tokens", "4", "--json", str(out_json), "--plot", str(out_png),
    ])
    assert bench_main(args) == 0

    data = json.loads(out_json.read_text())
    for key in ("model", "dtype", "device", "hardware", "max_new_tokens", "temperature", "methods"):
        assert key in data
    assert data["max_new_tokens"] == 16 and data["temperature"] == 0.0
    assert list(data["methods"]) == ["ar", "hf", "ngram"]
    assert len(data["run_order"]) == 6  # one shuffled order per question
    assert all(sorted(entry["methods"]) == ["ar", "hf", "ngram"] for entry in data["run_order"])
    groups = {"multi-turn", "translation", "summarization", "qa", "math_reasoning", "rag"}
    for name, entry in data["methods"].items():
        for key in ("tokens_per_s", "speedup", "mean_accepted", "identical", "total", "per_category"):
            assert key in entry, (name, key)
        assert set(entry["per_category"]) == groups
        assert entry["total"] == 7  # 5 single-turn + 1 two-turn question
        assert entry["tokens_per_s"] > 0
    assert data["methods"]["ar"]["speedup"] == pytest.approx(1.0)
    assert data["methods"]["ar"]["mean_accepted"] == pytest.approx(1.0)
    assert data["methods"]["hf"]["mean_accepted"] is None
    assert data["methods"]["ngram"]["mean_accepted"] >= 1.0
    # Greedy: plain transformers decoding matches ar on most prompts; any divergence is reported with the gap
    # ar decoded with there.
    for entry in data["methods"].values():
        assert entry["total"] - entry["identical"] == len(entry["divergences"])
        for divergence in entry["divergences"]:
            assert divergence["top2_gap"] is not None and divergence["top2_gap"] >= 0
            if divergence["baseline_token"] is not None and divergence["top2_gap"] > 0:  # (a tie: either)
                assert divergence["top1_token"] == divergence["baseline_token"]  # greedy ar took its top-1
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Tokenizer:
    eos_token_id = 2
    pad_token_id = None


def test_hf_runners_call_the_real_library_on_a_tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=2, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    prompt = [5, 6, 7, 8, 5, 6, 7]
    plain = HFRunner("hf", model, _Tokenizer()).run(prompt, 12, SamplingParams())
    lookup = HFRunner("hf-pld", model, _Tokenizer(), prompt_lookup_num_tokens=10).run(prompt, 12, SamplingParams())
    assert lookup.token_ids == plain.token_ids  # greedy prompt lookup decoding is lossless here (fp32)
    assert 0 < len(plain.token_ids) <= 12 and 2 not in plain.token_ids
    assisted = HFRunner("hf-assisted", model, _Tokenizer(), assistant_model=model).run(prompt, 12, SamplingParams())
    assert assisted.token_ids == plain.token_ids
    sampled = HFRunner("hf", model, _Tokenizer()).run(prompt, 8, SamplingParams(temperature=0.8, top_p=0.9, seed=1))
    assert len(sampled.token_ids) <= 8
