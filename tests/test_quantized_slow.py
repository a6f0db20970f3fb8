"""The embedded GGUF (SmolLM2-135M-Instruct, Q4_1) with its own int4 weights: every Q4_1 tensor maps onto
its layer exactly, and every drafter's greedy output equals plain decoding with the same weights."""

import pytest
import torch

from quickdraft.drafters import available_drafters
from quickdraft.engine import Engine
from quickdraft.models.loading import embedded_model_path, load_model
from quickdraft.models.quantized import Int4Linear, read_gguf_int4_groups

from test_slow_smollm2 import NEEDS_OTHER_MODEL, assert_greedy_identity

pytestmark = pytest.mark.slow

Q4_1_TENSORS = 210


@pytest.fixture(scope="module")
def int4_engine() -> Engine:
    return Engine.from_pretrained(weights="int4")


def test_every_q4_1_tensor_maps_onto_its_layer_with_the_files_own_weights():
    hf_model = load_model(None, dtype="float32", weights="dense").hf_model
    groups = read_gguf_int4_groups(embedded_model_path(), hf_model)
    assert len(groups) == Q4_1_TENSORS
    for module, found in groups.items():
        kernel = Int4Linear(found, [found.shape[0]], None, torch.float32).dequantized()
        assert torch.equal(kernel, module.weight.detach()), "differs from transformers' dequantized weights"


def test_the_int4_target_holds_int4_linears_and_no_float_copies(int4_engine):
    target = int4_engine.loaded.target
    assert target.dtype == torch.bfloat16
    assert all(isinstance(linear, Int4Linear) for linear in vars(target.layer_linears[0]).values())
    assert sum(p.numel() for p in int4_engine.hf_model.parameters()) < 1_000_000


@pytest.mark.parametrize("drafter", [d for d in available_drafters()
                                     if d not in NEEDS_OTHER_MODEL and not d.startswith("test-")])
def test_greedy_identity_on_real_prompts_with_int4_weights(int4_engine, drafter):
    assert_greedy_identity(int4_engine, drafter)
