"""Quantized weights in the native forward: GGUF 4-bit blocks map exactly onto int4 groups, the quantized
forward equals a dense forward of the same dequantized weights, its rows are row-exact, and every drafter's
greedy output equals plain decoding on the quantized target (tiny random models)."""

import copy
import platform

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from quickdraft.drafters import available_drafters
from quickdraft.engine import Engine
from quickdraft.heads import new_head
from quickdraft.models import gguf_blocks, int4_layout, quantized
from quickdraft.models.gguf_blocks import Int4Groups, int4_groups
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM
from quickdraft.models.quantized import (
    ConcatenatedLinear,
    Int4Linear,
    Int8Linear,
    QuantizedWeights,
    check_weights,
    int8_per_channel,
)

from conftest import CharTokenizer, perturbed_copy, tiny_hf_model

Q4_TYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K]
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3]]
#: Logits of the tiny models reach about 4; float32 activations leave only summation-order differences.
FLOAT32_TOLERANCE = 1e-4


def random_blocks(qtype: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes ``[rows, bytes per row]`` of a random weight matrix: gguf's own quantizer for Q4_0 and
    Q4_1; random bytes with random fp16 ``d``/``dmin`` for Q4_K (gguf-py has no Q4_K quantizer)."""
    rng = np.random.default_rng(seed)
    if qtype != GGMLQuantizationType.Q4_K:
        return quantize((rng.standard_normal((rows, columns)) * 0.05).astype(np.float32), qtype)
    blocks = rng.integers(0, 256, (rows * columns // 256, 144), dtype=np.uint8)
    for offset in (0, 2):
        scale = (rng.random(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def mapping_error(qtype: GGMLQuantizationType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``|kernel's weights - gguf's dequantized weights|`` ``[rows, columns]`` for random blocks, the kernel's
    weights read back through ``torch._weight_int4pack_mm_for_cpu`` itself."""
    raw = random_blocks(qtype, 48, 512)
    groups = int4_groups(raw, qtype)
    kernel = Int4Linear(groups, [48], None, dtype).dequantized().float()
    return (kernel - torch.from_numpy(dequantize(raw, qtype))).abs()


@pytest.mark.parametrize("qtype", Q4_TYPES, ids=lambda q: q.name)
def test_gguf_4bit_blocks_become_int4_groups_with_the_same_weights(qtype):
    reference = torch.from_numpy(dequantize(random_blocks(qtype, 48, 512), qtype))
    error = mapping_error(qtype)
    if qtype == GGMLQuantizationType.Q4_K:
        # the zero 8 d sc - dmin mn is rounded to float32 where it needs more than 24 bits: then a weight may
        # be off by up to one float32 step of that zero (and of itself)
        zeros = int4_groups(random_blocks(qtype, 48, 512), qtype).zeros.repeat_interleave(32, dim=1)
        bound = np.spacing(zeros.abs().numpy()) + np.spacing(reference.abs().numpy())
        assert (error <= torch.from_numpy(bound)).all()
        assert (error == 0).float().mean() > 0.9
    else:
        assert error.max().item() == 0.0
    assert torch.equal(int4_groups(random_blocks(qtype, 48, 512), qtype).dequantize() == reference,
                       error == 0)


def test_the_mapping_check_catches_a_wrong_zero_point(monkeypatch):
    correct = gguf_blocks._q4_1

    def shifted(blocks):
        codes, d, zero = correct(blocks)
        return codes, d, zero - d  # an off-by-one zero point (m + 7 d)

    monkeypatch.setitem(gguf_blocks._DECODERS, GGMLQuantizationType.Q4_1, shifted)
    assert mapping_error(GGMLQuantizationType.Q4_1).max().item() > 1e-4


def test_q_and_k_rows_are_reordered_as_transformers_reorders_them():
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    weights = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        order = quantized._row_order(processor, name, 32)
        assert np.array_equal(processor.process(weights=weights, name=name).weights, weights[order.numpy()])
        assert not torch.equal(order, torch.arange(32))
    assert torch.equal(quantized._row_order(processor, "blk.0.attn_v.weight", 32), torch.arange(32))


def q4_1_groups(hf_model: torch.nn.Module, only: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")) -> dict[torch.nn.Module, Int4Groups]:
    """Int4 groups for the decoder layers' linears named in ``only``, quantized to Q4_1 by gguf's quantizer,
    as a GGUF file of the model would hold them."""
    groups = {}
    for name, module in hf_model.named_modules():
        if name.rsplit(".", 1)[-1] in only:
            raw = quantize(module.weight.detach().numpy(), GGMLQuantizationType.Q4_1)
            groups[module] = int4_groups(raw, GGMLQuantizationType.Q4_1)
    return groups


def dequantized_twin(hf_model: torch.nn.Module, groups: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A dense copy of ``hf_model`` holding exactly the weights :class:`QuantizedWeights` multiplies by."""
    twin = copy.deepcopy(hf_model)
    originals = dict(hf_model.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                source = originals[name]
                if source in groups:
                    module.weight.copy_(groups[source].dequantize())
                else:
                    codes, scales = int8_per_channel(source.weight.detach().float(), dtype)
                    module.weight.copy_(codes.float() * scales.float()[:, None])
    return twin


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_forward_equals_a_dense_forward_of_the_same_weights(architecture, mode):
    hf_model = tiny_hf_model(architecture)
    groups = q4_1_groups(hf_model) if mode == "int4" else {}
    reference = NativeCausalLM(dequantized_twin(hf_model, groups, torch.float32))
    model = NativeCausalLM(hf_model, QuantizedWeights(torch.float32, groups))
    ids = PROMPTS[1]
    expected = reference.new_session(64).prefill(ids)
    got = model.new_session(64).prefill(ids)
    assert (got - expected).abs().max().item() < FLOAT32_TOLERANCE


def test_bfloat16_activations_stay_close_to_the_float32_forward():
    hf_model = tiny_hf_model("llama")
    expected = NativeCausalLM(dequantized_twin(hf_model, {}, torch.bfloat16)).new_session(64).prefill(PROMPTS[0])
    got = NativeCausalLM(hf_model, QuantizedWeights(torch.bfloat16)).new_session(64).prefill(PROMPTS[0])
    assert got.argmax() == expected.argmax()
    # bfloat16 keeps 8 bits: about 0.4% of the largest logit per rounding, a few roundings deep
    assert (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_rows_equal_the_same_rows_computed_alone(kind):
    weight = torch.randn(96, 256) * 0.05
    if kind == "int8":
        linear = Int8Linear(weight, [96], None, torch.bfloat16)
    else:
        linear = Int4Linear(int4_groups(quantize(weight.numpy(), GGMLQuantizationType.Q4_1),
                                        GGMLQuantizationType.Q4_1), [96], None, torch.bfloat16)
    x = torch.randn(1, 70, 256, dtype=torch.bfloat16)
    alone = torch.cat([linear(x[:, i:i + 1]) for i in range(70)], dim=1)
    for rows in (2, 3, 16, 31, 32, 33, 70):
        assert torch.equal(linear(x[:, :rows], row_exact=True), alone[:, :rows]), rows


@pytest.mark.parametrize("rows, columns", [(64, 32), (128, 576), (192, 64)])
def test_packed_int4_codes_read_back_exactly(rows, columns):
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert int4_layout.packed_block() in (64, 32)  # PyTorch's AVX-512 and AVX2 layouts are known
    elif int4_layout.packed_block() is None:
        pytest.skip("this CPU packs int4 codes in a layout quickdraft does not read back")
    codes = torch.randint(0, 16, (rows, columns), dtype=torch.int32, generator=torch.Generator().manual_seed(rows))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(int4_layout.unpacked_codes(packed, rows, columns).int(), codes)
    tail = torch._convert_weight_to_int4pack_for_cpu(codes[:rows - 16], 1)
    assert int4_layout.unpacked_codes(tail, rows - 16, columns) is None  # a tail block has another format


def wide_int4_linear(rows: int = 128, columns: int = 256) -> Int4Linear:
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(1)) * 0.05
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    return Int4Linear(int4_groups(raw, GGMLQuantizationType.Q4_1), [rows], None, torch.float32)


def test_a_wide_product_that_need_not_be_row_exact_multiplies_the_dequantized_weights(monkeypatch):
    linear = wide_int4_linear()
    if linear.dequantized_weight() is None:
        pytest.skip("this CPU packs int4 codes in a layout quickdraft does not read back")
    kernel_weights = linear.dequantized()  # read back through the kernel itself
    assert torch.allclose(linear.dequantized_weight(), kernel_weights, rtol=1e-6, atol=1e-8)
    x = torch.randn(1, quantized.WIDE_ROWS, 256)
    kernel_rows = []
    monkeypatch.setattr(Int4Linear, "_product", lambda self, x: kernel_rows.append(x.shape[-2]) or x @ kernel_weights.T)
    wide = linear(x)
    assert kernel_rows == []  # no kernel call
    assert torch.allclose(wide, x @ kernel_weights.T, atol=1e-5)
    linear(x, row_exact=True)  # row-exact: the kernel, in pieces
    assert kernel_rows == [quantized.ROW_INVARIANT_ROWS] * (quantized.WIDE_ROWS // quantized.ROW_INVARIANT_ROWS)
    linear(x[:, 1:])  # fewer rows than WIDE_ROWS: the kernel, whole
    assert kernel_rows[-1] == quantized.WIDE_ROWS - 1


@pytest.mark.parametrize("native_bf16, computed_in", [(True, torch.bfloat16), (False, torch.float32)])
def test_a_wide_bfloat16_product_runs_in_float32_where_the_cpu_lacks_bfloat16(monkeypatch, native_bf16,
                                                                              computed_in):
    linear = wide_int4_linear()
    if linear.dequantized_weight() is None:
        pytest.skip("this CPU packs int4 codes in a layout quickdraft does not read back")
    monkeypatch.setattr(quantized, "cpu_has_native_bf16", lambda: native_bf16)
    seen = []
    dense = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(x.dtype) or dense(x, w, b))
    out = linear(torch.randn(1, quantized.WIDE_ROWS, 256, dtype=torch.bfloat16))
    assert seen == [computed_in] and out.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_long_prompt_forward_equals_a_dense_forward_of_the_same_weights(mode):
    hf_model = tiny_hf_model("llama")
    groups = q4_1_groups(hf_model) if mode == "int4" else {}
    reference = NativeCausalLM(dequantized_twin(hf_model, groups, torch.float32))
    model = NativeCausalLM(hf_model, QuantizedWeights(torch.float32, groups))
    ids = (PROMPTS[1] * 20)[: quantized.WIDE_ROWS + 5]
    expected = reference.new_session(256).prefill(ids)
    got = model.new_session(256).prefill(ids)
    assert (got - expected).abs().max().item() < FLOAT32_TOLERANCE


def test_q_and_k_in_int4_and_v_in_int8_are_computed_apart_and_concatenated():
    hf_model = tiny_hf_model("llama")
    attn = hf_model.model.layers[0].self_attn
    holder = QuantizedWeights(torch.float32, q4_1_groups(hf_model, ("q_proj", "k_proj")))
    fused = holder.linear([attn.q_proj, attn.k_proj, attn.v_proj])
    assert isinstance(fused, ConcatenatedLinear)
    x = torch.randn(1, 5, 64)
    q, k, v = fused(x)
    assert torch.equal(q, holder.linear([attn.q_proj])(x)) and torch.equal(v, holder.linear([attn.v_proj])(x))


def test_the_transformers_model_frees_its_quantized_weights_and_says_so():
    hf_model = tiny_hf_model("llama")
    before = sum(p.numel() for p in hf_model.parameters())
    NativeCausalLM(hf_model, QuantizedWeights(torch.bfloat16))
    assert sum(p.numel() for p in hf_model.parameters()) < before / 10
    assert hf_model.model.norm.weight.dtype == torch.bfloat16
    assert hf_model.model.rotary_emb.inv_freq.dtype == torch.float32
    with pytest.raises(RuntimeError, match="packed into quantized form"):
        hf_model(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("mode, device", [("int3", "cpu"), ("int8", "cuda"), ("int4", "cuda")])
def test_unknown_modes_and_quantized_weights_off_cpu_are_refused(mode, device):
    with pytest.raises(ValueError):
        check_weights(mode, torch.device(device))


def test_auto_times_dense_and_int4_in_turns(monkeypatch):
    hf_model = tiny_hf_model("llama")
    groups = q4_1_groups(hf_model)
    timed = []
    monkeypatch.setattr(quantized, "_cost", lambda linears, widths, dtype: timed.append(dtype) or len(timed))
    mode, seconds = quantized.fastest_mode(hf_model, groups, torch.bfloat16, torch.float32)
    assert timed[:4] == [torch.float32, torch.bfloat16] * 2  # interleaved, so load slows both alike
    assert len(timed) == 2 * quantized.AUTO_ROUNDS
    assert mode == "dense" and seconds == {"dense": 1, "int4": 2}  # the best round of each


def test_auto_times_every_layer_that_fits_its_byte_budget(monkeypatch):
    hf_model = tiny_hf_model("llama")
    layers = hf_model.model.layers
    stacks = quantized._timed_layer_stacks(hf_model, torch.bfloat16)
    assert len(stacks) == 4 * len(layers)  # a small model: every layer, not one layer timed over and over
    assert stacks[-1] == [layers[-1].mlp.down_proj]
    per_layer = sum(m.weight.numel() for stack in stacks[:4] for m in stack) * 2
    monkeypatch.setattr(quantized, "AUTO_BYTES", per_layer + 1)
    assert len(quantized._timed_layer_stacks(hf_model, torch.bfloat16)) == 4
    monkeypatch.setattr(quantized, "AUTO_BYTES", 1)  # not even one layer fits: the first is timed still
    assert len(quantized._timed_layer_stacks(hf_model, torch.bfloat16)) == 4


def test_auto_choice_is_measured_once_per_model_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKDRAFT_CACHE", str(tmp_path / "cache"))
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF" + bytes(100))
    hf_model = tiny_hf_model("llama")
    groups = q4_1_groups(hf_model)
    read_groups = lambda: groups  # noqa: E731
    first = quantized.cached_fastest_mode(model_file, hf_model, read_groups, torch.bfloat16, torch.float32)
    assert first in ("dense", "int4")
    monkeypatch.setattr(quantized, "fastest_mode", lambda *args: pytest.fail("measured twice"))
    assert quantized.cached_fastest_mode(model_file, hf_model, read_groups, torch.bfloat16, torch.float32) == first
    model_file.write_bytes(b"GGUF" + bytes(101))  # another model file: measured again
    with pytest.raises(pytest.fail.Exception, match="measured twice"):
        quantized.cached_fastest_mode(model_file, hf_model, read_groups, torch.bfloat16, torch.float32)


def quantized_engine(architecture: str, mode: str) -> tuple[Engine, torch.nn.Module]:
    """An engine on the tiny model with quantized weights (bfloat16 activations), and a dense copy of the
    model made before quantizing (for the draft-model drafter)."""
    hf_model = tiny_hf_model(architecture)
    dense = copy.deepcopy(hf_model)
    groups = q4_1_groups(hf_model) if mode == "int4" else {}
    target = NativeCausalLM(hf_model, QuantizedWeights(torch.bfloat16, groups))
    return Engine(LoadedModel(f"tiny-{architecture}-{mode}", CharTokenizer(), hf_model, target)), dense


def drafters_to_test() -> list[str]:
    return [name for name in available_drafters() if name != "xvocab" and not name.startswith("test-")]




def drafter_options(drafter: str, engine: Engine, dense: torch.nn.Module) -> dict:
    """What a drafter needs beyond its defaults on a tiny model: a draft model, or an untrained head (no
    shipped head fits a tiny model)."""
    if drafter == "draft":
        return {"model": NativeCausalLM(perturbed_copy(dense))}
    if drafter in ("eagle", "medusa"):
        target = engine.loaded.target
        return {"head": new_head(drafter, target, engine.tokenizer, list(range(target.vocab_size)))}
    return {}


@pytest.mark.parametrize("architecture, mode", [("llama", "int8"), ("qwen2", "int8"), ("llama", "int4")])
def test_every_drafter_reproduces_plain_decoding_on_the_quantized_target(architecture, mode):
    plain, dense = quantized_engine(architecture, mode)
    accepting = set()
    for drafter in drafters_to_test():
        speculative = plain.with_drafter(drafter, drafter_options(drafter, plain, dense))
        for prompt in PROMPTS:
            expected = plain.generate_ids(prompt, 40)
            got = speculative.generate_ids(prompt, 40)
            assert got.token_ids == expected.token_ids, f"{drafter} diverged on {architecture} {mode}"
            if got.stats.accepted_tokens:
                accepting.add(drafter)
    # which drafters' guesses come true depends on the random model's output (lookahead's and the n-gram
    # drafters' may not on these short outputs); the identity must not be vacuous for all of them
    assert len(accepting) >= 3 and "draft" in accepting, f"only {sorted(accepting)} had draft tokens accepted"


def test_packed_weights_read_back_give_the_same_forward_without_reading_groups(tmp_path):
    """What the first load packs (int4 groups, int8 codes) is saved and read back bit for bit; a load from the
    saved weights neither reads the file's groups nor quantizes anything."""
    from quickdraft.models import packed_cache

    hf_model = tiny_hf_model("llama")
    twin = copy.deepcopy(hf_model)
    names = {module: name for name, module in hf_model.named_modules()}
    recorder = packed_cache.PackedWeights(names, key=None)
    first = NativeCausalLM(hf_model, QuantizedWeights(torch.bfloat16, q4_1_groups(hf_model, ("q_proj", "k_proj")),
                                                      recorder))
    assert {type(linear).__name__ for linear in recorder.built.values()} == {"ConcatenatedLinear", "Int8Linear"}
    packed_cache.write(tmp_path, recorder.built)

    def no_groups() -> dict:
        raise AssertionError("read the groups although every linear was saved")

    saved = packed_cache.read(tmp_path)
    names = {module: name for name, module in twin.named_modules()}
    second = NativeCausalLM(twin, QuantizedWeights(torch.bfloat16, no_groups, packed_cache.PackedWeights(names, None,
                                                                                                         saved)))
    for ids in PROMPTS:
        assert torch.equal(second.new_session(64).prefill(ids), first.new_session(64).prefill(ids))
