"""End to end: ``quickdraft bench`` on the embedded model with the built-in prompt set."""

from __future__ import annotations

import argparse
import json

import pytest

from quickdraft.bench.cli import add_bench_arguments, bench_main

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
    # Greedy: plain transformers decoding matches ar on most prompts; any divergence is reported with a gap.
    for entry in data["methods"].values():
        assert entry["total"] - entry["identical"] == len(entry["divergences"])
        for divergence in entry["divergences"]:
            assert divergence["top2_gap"] is not None and divergence["top2_gap"] >= 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
