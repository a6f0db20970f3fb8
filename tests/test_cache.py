"""The on-disk cache (:mod:`quickdraft.cache`): converted GGUF models, tokenizers and cost curves.

Every test here points ``QUICKDRAFT_CACHE`` at its own temporary folder, so none writes to the user's cache.
The GGUF files are tiny Llama models written with the ``gguf`` package (a 96-token byte-level vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from quickdraft import cache
from quickdraft.budget import CostCurve
from quickdraft.cli import build_parser, main
from quickdraft.models import loading
from quickdraft.models.loading import cached_cost_curve, load_model, load_tokenizer

from conftest import tiny_loaded

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache root for each test (never the user's)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("QUICKDRAFT_CACHE", str(root))
    return root


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny float32 Llama GGUF whose weights are drawn with ``seed``."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([chr(65 + i) for i in range(VOCAB - 3)] + ["AB", "<s>", "</s>"])
    writer.add_token_types([1] * (VOCAB - 2) + [3, 3])
    writer.add_token_merges(["A B"])
    writer.add_bos_token_id(VOCAB - 2)
    writer.add_eos_token_id(VOCAB - 1)
    kv_width = HIDDEN // HEADS * KV_HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "output.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN), f"blk.{i}.attn_k.weight": (kv_width, HIDDEN),
            f"blk.{i}.attn_v.weight": (kv_width, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (INTERMEDIATE, HIDDEN), f"blk.{i}.ffn_up.weight": (INTERMEDIATE, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, INTERMEDIATE),
        })
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return write_tiny_gguf(tmp_path / "models" / "tiny.gguf")


class Conversions:
    """Counts the GGUF conversions (tokenizer and model) that actually run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("_write_tokenizer", "_write_model"):
            original = getattr(loading._GgufConversion, name)
            monkeypatch.setattr(loading._GgufConversion, name, self._counting(original))

    def _counting(self, original):
        def wrapper(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return wrapper


def state(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_second_load_reads_the_cache_and_gives_the_same_model(gguf_file, monkeypatch):
    conversions = Conversions(monkeypatch)
    cold = load_model(str(gguf_file), dtype="float32", device="cpu")
    assert conversions.count == 2  # tokenizer and model
    warm = load_model(str(gguf_file), dtype="float32", device="cpu")
    assert conversions.count == 2
    assert same_weights(state(cold.hf_model), state(warm.hf_model))
    for text in ("ABCD", "HELLO WORLD", "ZZAB"):
        assert cold.tokenizer(text)["input_ids"] == warm.tokenizer(text)["input_ids"]
    assert cold.tokenizer("ABCD")["input_ids"] == [VOCAB - 3, 2, 3]  # the merge "A B" applies
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(cold.hf_model(ids).logits, warm.hf_model(ids).logits)
    assert load_tokenizer(str(gguf_file))("ABCD")["input_ids"] == [VOCAB - 3, 2, 3]
    assert conversions.count == 2


def test_the_cache_key_holds_dtype_and_weights_mode(gguf_file, monkeypatch):
    conversions = Conversions(monkeypatch)
    load_model(str(gguf_file), dtype="float32", device="cpu", weights="dense")
    bf16 = load_model(str(gguf_file), dtype="bfloat16", device="cpu", weights="dense")
    assert conversions.count == 3  # the tokenizer is shared; the model is converted once per dtype
    assert bf16.target.dtype == torch.bfloat16
    key = loading.model_key(gguf_file, torch.float32)
    assert key["weights"] == "dense" and key["dtype"] == "float32"
    assert cache.digest(key) != cache.digest(loading.model_key(gguf_file, torch.float32, weights="int4"))
    # the conversion is shared by the weights modes that load in one dtype (quantized modes load float32)
    assert "weights" not in loading.conversion_key(gguf_file, torch.float32)
    load_model(str(gguf_file), dtype="float32", device="cpu", weights="int8")
    assert conversions.count == 3


def test_a_changed_model_file_is_converted_again(gguf_file, monkeypatch):
    conversions = Conversions(monkeypatch)
    before = state(load_model(str(gguf_file), dtype="float32", device="cpu").hf_model)
    stat = gguf_file.stat()
    write_tiny_gguf(gguf_file, seed=1)  # same size, new content
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert gguf_file.stat().st_size == stat.st_size
    after = state(load_model(str(gguf_file), dtype="float32", device="cpu").hf_model)
    assert conversions.count == 4
    assert not same_weights(before, after)


@pytest.mark.parametrize("damage", ["truncate", "delete", "no-record"])
def test_a_damaged_model_entry_is_rebuilt(gguf_file, monkeypatch, damage):
    conversions = Conversions(monkeypatch)
    before = state(load_model(str(gguf_file), dtype="float32", device="cpu").hf_model)
    entry = cache.entry_path("model", loading.conversion_key(gguf_file, torch.float32))
    weights = entry / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete":
        weights.unlink()
    else:
        (entry / cache.ENTRY_FILE).unlink()  # as a crash before the rename would never leave, but a hand might
    after = state(load_model(str(gguf_file), dtype="float32", device="cpu").hf_model)
    assert conversions.count == 3
    assert same_weights(before, after)


def test_cached_builds_once_and_rebuilds_an_unreadable_entry():
    writes = []

    def write(folder: Path) -> None:
        writes.append(folder)
        (folder / "value.txt").write_text("42")

    def read(folder: Path) -> int:
        return int((folder / "value.txt").read_text())

    key = {"source": "x", "version": "1"}
    assert cache.cached("demo", key, write, read) == 42
    assert cache.cached("demo", key, write, read) == 42
    assert len(writes) == 1
    (cache.entry_path("demo", key) / "value.txt").write_text("garbage")
    assert cache.cached("demo", key, write, read) == 42
    assert len(writes) == 2
    assert cache.cached("demo", {**key, "version": "2"}, write, read) == 42
    assert len(writes) == 3
    assert not [p for p in cache.entry_path("demo", key).parent.iterdir() if p.name.startswith(".")]


def test_a_store_that_loses_the_race_keeps_the_entry_already_there():
    key = {"source": "race"}
    first = cache.store("demo", key, lambda folder: (folder / "value.txt").write_text("first"))
    second = cache.store("demo", key, lambda folder: (folder / "value.txt").write_text("second"))
    assert first == second
    assert (first / "value.txt").read_text() == "first"
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_a_failed_write_leaves_no_entry():
    def write(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cache.store("demo", {"source": "fail"}, write)
    assert cache.lookup("demo", {"source": "fail"}) is None
    assert list((cache.cache_root() / "demo").iterdir()) == []


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUICKDRAFT_CACHE", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("QUICKDRAFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "quickdraft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "quickdraft"


def test_the_cost_curve_is_measured_once_per_model_and_machine(monkeypatch):
    measured = []
    curve = CostCurve((1, 2, 4), (1.0, 1.2, 1.5))

    def measure(target, *args, **kwargs):
        measured.append(target)
        return curve

    monkeypatch.setattr(CostCurve, "measure", measure)
    target = tiny_loaded().target
    key = {"source": "/m.gguf", "source_fingerprint": "abc", "dtype": "float32", "weights": "dense"}
    assert cached_cost_curve(target, key) == curve
    assert cached_cost_curve(target, key) == curve
    assert len(measured) == 1
    assert cached_cost_curve(target, {**key, "weights": "int8"}) == curve
    assert len(measured) == 2
    entry = cache.entry_path("cost-curve", {**key, **cache.machine_key("cpu")})
    (entry / "curve.json").write_text("{not json")
    assert cached_cost_curve(target, key) == curve
    assert len(measured) == 3
    assert cached_cost_curve(target, None) == curve  # a model built in memory: measured, not cached
    assert len(measured) == 4


def test_cache_ls_and_clear(gguf_file, capsys):
    load_model(str(gguf_file), dtype="float32", device="cpu", weights="dense")
    capsys.readouterr()
    assert main(["cache", "ls"]) == 0
    listed = capsys.readouterr().out
    assert "tiny.gguf" in listed and "float32" in listed and "2 entries" in listed
    assert main(["cache", "clear"]) == 0
    assert "removed 2 cache entries" in capsys.readouterr().err
    assert cache.entries() == []
    assert main(["cache", "ls"]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_generate_and_demo_default_to_the_best_methods():
    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "hi"]).drafter == "auto"
    assert parser.parse_args(["demo"]).methods == "ar,suffix,auto"


def test_quantized_weights_are_packed_on_the_first_load_only(gguf_file, monkeypatch):
    from quickdraft.models import quantized

    built = []
    build = quantized.Int8Linear.__init__
    monkeypatch.setattr(quantized.Int8Linear, "__init__", lambda self, *a, **k: built.append(1) or build(self, *a, **k))
    first = load_model(str(gguf_file), dtype="float32", device="cpu", weights="int8")
    packed = len(built)
    assert packed > 0
    second = load_model(str(gguf_file), dtype="float32", device="cpu", weights="int8")
    assert len(built) == packed  # read from the cache
    ids = [1, 2, 3, 4]
    assert torch.equal(second.target.new_session(16).prefill(ids), first.target.new_session(16).prefill(ids))
    stat = gguf_file.stat()
    write_tiny_gguf(gguf_file, seed=1)  # same size, new content
    os.utime(gguf_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    load_model(str(gguf_file), dtype="float32", device="cpu", weights="int8")
    assert len(built) == 2 * packed  # a changed file is packed again
