"""The native forward against transformers' own forward, on tiny random models of each architecture."""

import pytest
import torch

from quickdraft.models.hf import HFCausalLM
from quickdraft.models.layouts import ROW_INVARIANT_ROWS, FusedLinear, prepacking_available
from quickdraft.models.native import NativeCausalLM
from quickdraft.types import DraftTree

from conftest import ARCHITECTURES, tiny_hf_model


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


def test_native_prefill_and_chain_match_transformers(architecture):
    hf_model = tiny_hf_model(architecture)
    ids = torch.randint(0, 90, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = reference_logits(hf_model, ids)
    session = NativeCausalLM(hf_model).new_session(64)
    last = session.prefill(ids[:30])
    assert (last - expected[29]).abs().max() < 1e-4
    out = session.verify(ids[30], DraftTree.chain(ids[31:]))
    assert (out.logits - expected[30:]).abs().max() < 1e-4


def test_native_tree_rows_match_each_branch_run_alone(architecture):
    hf_model = tiny_hf_model(architecture)
    prefix = [5, 9, 11, 3, 7, 2]
    branches = [[10, 20, 30], [10, 21], [40, 41, 42]]
    tree = DraftTree.from_paths(branches)
    session = NativeCausalLM(hf_model).new_session(32)
    session.prefill(prefix[:-1])
    out = session.verify(prefix[-1], tree)
    tokens = tree.tokens.tolist()
    for branch in branches:
        expected = reference_logits(hf_model, prefix + branch)
        node = -1
        for depth, token in enumerate(branch):
            node = next(i for i, (t, p) in enumerate(zip(tokens, tree.parents.tolist())) if t == token and p == node)
            assert (out.logits[node + 1] - expected[len(prefix) + depth]).abs().max() < 1e-4
    assert (out.logits[0] - reference_logits(hf_model, prefix)[-1]).abs().max() < 1e-4


def test_commit_compacts_the_accepted_path_so_decoding_continues_correctly(architecture):
    hf_model = tiny_hf_model(architecture)
    prefix = [5, 9, 11, 3]
    tree = DraftTree.from_paths([[10, 20], [40, 41, 42]])  # nodes 0:10 1:20 2:40 3:41 4:42
    session = NativeCausalLM(hf_model).new_session(32)
    session.prefill(prefix[:-1])
    session.verify(prefix[-1], tree)
    session.commit([2, 3])  # keep 40, 41
    assert session.cached_length == len(prefix) + 2
    out = session.verify(77, DraftTree.empty())
    expected = reference_logits(hf_model, prefix + [40, 41, 77])[-1]
    assert (out.logits[0] - expected).abs().max() < 1e-4


BREADTH_FIRST_TREE = DraftTree(torch.tensor([10, 40, 20, 41, 42]), torch.tensor([-1, -1, 0, 1, 3]))


def test_a_tree_not_in_depth_first_order_comes_back_in_its_own_node_order(architecture):
    """The forward lays a breadth-first tree out depth-first; its rows come back in the tree's order, the same
    numbers as for the tree given depth-first, and each matches its branch run alone."""
    hf_model = tiny_hf_model(architecture)
    prefix = [5, 9, 11, 3]
    model = NativeCausalLM(hf_model)
    breadth_first, depth_first = model.new_session(32), model.new_session(32)
    for session in (breadth_first, depth_first):
        session.prefill(prefix[:-1])
    out = breadth_first.verify(prefix[-1], BREADTH_FIRST_TREE)
    same_tree = depth_first.verify(prefix[-1], DraftTree.from_paths([[10, 20], [40, 41, 42]]))
    assert torch.equal(out.logits, same_tree.logits[[0, 1, 3, 2, 4, 5]])
    for node, branch in enumerate([[10], [40], [10, 20], [40, 41], [40, 41, 42]]):
        expected = reference_logits(hf_model, prefix + branch)[-1]
        assert (out.logits[node + 1] - expected).abs().max() < 1e-4


def test_commit_after_a_breadth_first_tree_keeps_the_accepted_path(architecture):
    hf_model = tiny_hf_model(architecture)
    prefix = [5, 9, 11, 3]
    session = NativeCausalLM(hf_model).new_session(32)
    session.prefill(prefix[:-1])
    session.verify(prefix[-1], BREADTH_FIRST_TREE)
    session.commit([1, 3])  # keep 40, 41: laid out at rows 3 and 4
    out = session.verify(77, DraftTree.empty())
    expected = reference_logits(hf_model, prefix + [40, 41, 77])[-1]
    assert (out.logits[0] - expected).abs().max() < 1e-4


def test_skip_layers_and_hidden_states():
    hf_model = tiny_hf_model("llama")
    model = NativeCausalLM(hf_model)
    session = model.new_session(32)
    session.prefill([1, 2, 3])
    full = session.draft_forward([4], frozenset(), hidden_layers=(0, -1))
    skipped = session.draft_forward([4], frozenset({1, 2}), hidden_layers=(0, -1))
    assert set(full.hidden) == {0, -1}
    assert torch.equal(full.hidden[0], skipped.hidden[0])
    assert not torch.allclose(full.logits, skipped.logits)
    with torch.inference_mode():
        out = hf_model(torch.tensor([[1, 2, 3, 4]]), output_hidden_states=True)
    assert (full.hidden[0] - out.hidden_states[1][0, -1:]).abs().max() < 1e-4
    assert len(model.layers) == 3, "skipping layers must not mutate the model"


def test_hf_fallback_matches_transformers_and_crops():
    hf_model = tiny_hf_model("llama")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    session = HFCausalLM(hf_model).new_session(32)
    session.prefill(ids[:4])
    session.verify(ids[4], DraftTree.chain([70, 71]))
    session.commit([])
    out = session.verify(ids[5], DraftTree.chain(ids[6:]))
    assert (out.logits - reference_logits(hf_model, ids)[5:]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="chains only"):
        session.verify(1, DraftTree.from_paths([[1], [2]]))


def test_hf_fallback_prefill_computes_the_output_layer_for_the_last_prompt_token_only():
    hf_model = tiny_hf_model("llama")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    rows_projected = []
    hook = hf_model.lm_head.register_forward_hook(lambda module, inputs, output: rows_projected.append(
        inputs[0].shape[1]))
    session = HFCausalLM(hf_model).new_session(32)
    try:
        last = session.prefill(ids[:6])
        extended = session.extend(ids[6:])
    finally:
        hook.remove()
    assert rows_projected == [1, 1]
    reference = reference_logits(hf_model, ids)
    assert (last - reference[5]).abs().max() < 1e-4
    assert (extended - reference[7]).abs().max() < 1e-4


def test_hf_fallback_keeps_sliding_window_models_exact_past_the_window_through_rollbacks():
    hf_model = tiny_hf_model("mistral", sliding_window=6)
    ids = torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    session = HFCausalLM(hf_model).new_session(32)
    session.prefill(ids[:10])
    session.verify(ids[10], DraftTree.chain([70, 71, 72]))
    session.commit([])
    out = session.verify(ids[11], DraftTree.chain(ids[12:]))
    assert (out.logits - reference_logits(hf_model, ids)[11:]).abs().max() < 1e-4


def test_native_forward_stops_at_the_sliding_window_it_does_not_apply():
    assert NativeCausalLM(tiny_hf_model("mistral", sliding_window=6)).max_context == 6
    assert NativeCausalLM(tiny_hf_model("mistral")).max_context == 512
    assert NativeCausalLM(tiny_hf_model("qwen2", sliding_window=6)).max_context == 512


def test_all_architectures_are_covered():
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "qwen3"}


def _linears(bias: bool) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(48, 40, bias=bias), torch.nn.Linear(48, 8, bias=False), torch.nn.Linear(48, 16, bias=bias)]


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 3, 48), (2, 5, 48), (17, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_linear_matches_each_layer_for_every_row_count(shape, bias):
    layers = _linears(bias)
    fused = FusedLinear(layers)
    assert fused.prepacked == prepacking_available(layers[0].weight)
    x = torch.randn(shape)
    outputs = fused(x)
    assert len(outputs) == 3
    for out, layer in zip(outputs, layers):
        assert out.shape == (*shape[:-1], layer.out_features)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_a_single_layer_gives_its_output_alone():
    layer = _linears(True)[0]
    x = torch.randn(1, 4, 48)
    torch.testing.assert_close(FusedLinear([layer])(x), layer(x), rtol=1e-5, atol=1e-5)


PREPACKABLE = [dtype for dtype in (torch.float32, torch.bfloat16) if prepacking_available(torch.zeros(1, dtype=dtype))]


@pytest.mark.parametrize("dtype", PREPACKABLE)
@pytest.mark.parametrize("width", [48, 576, 1536])
def test_prepacked_rows_do_not_depend_on_how_many_rows_are_computed_together(dtype, width):
    """Every row of a k-row product equals that row computed alone, also at SmolLM2's widths (576 in, and 1536
    for the MLP's down projection, where oneDNN on AVX-512 sums a lone row in another order than two or more)."""
    torch.manual_seed(0)
    rows = torch.randn(1, 24, width, dtype=dtype)
    down_projection = [torch.nn.Linear(width, 576, bias=False)]
    fused_with_bias = [torch.nn.Linear(width, 40), torch.nn.Linear(width, 8, bias=False), torch.nn.Linear(width, 16)]
    for layers in (down_projection, fused_with_bias):
        layers = [layer.to(dtype) for layer in layers]
        fused = FusedLinear(layers)
        assert fused.prepacked
        one_by_one = torch.cat([_joined(fused, rows[:, i:i + 1]) for i in range(24)], dim=1)
        for count in (2, 5, 24):
            assert torch.equal(_joined(fused, rows[:, :count]), one_by_one[:, :count])
        expected = torch.cat([layer(rows) for layer in layers], dim=-1)
        torch.testing.assert_close(_joined(fused, rows).float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", PREPACKABLE)
def test_row_exact_products_of_many_rows_equal_each_row_alone(dtype):
    """Past ``ROW_INVARIANT_ROWS`` rows a row-exact product goes in pieces, so every row still equals that row
    computed alone; a plain product of that many rows does not promise it."""
    torch.manual_seed(0)
    fused = FusedLinear([torch.nn.Linear(576, 1536, bias=False).to(dtype)])
    rows = torch.randn(1, 70, 576, dtype=dtype)
    one_by_one = torch.cat([fused(rows[:, i:i + 1]) for i in range(70)], dim=1)
    for count in (ROW_INVARIANT_ROWS + 1, 70):
        assert torch.equal(fused(rows[:, :count], row_exact=True), one_by_one[:, :count])


def _joined(fused: FusedLinear, x: torch.Tensor) -> torch.Tensor:
    """All of a fused linear's outputs side by side."""
    out = fused(x)
    return out if isinstance(out, torch.Tensor) else torch.cat(out, dim=-1)


def test_one_token_steps_match_transformers(architecture):
    """Single-token forwards take the native forward's one-row paths (a lone query row and a lone linear row
    computed as the first of two; grouped query heads folded into one attention call)."""
    hf_model = tiny_hf_model(architecture)
    ids = torch.randint(0, 90, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = reference_logits(hf_model, ids)
    session = NativeCausalLM(hf_model).new_session(32)
    session.prefill(ids[:16])
    for position in range(16, 24):
        logits = session.extend([ids[position]])
        assert (logits - expected[position]).abs().max() < 1e-4


def test_fused_linear_falls_back_to_f_linear_for_float64():
    layers = [layer.double() for layer in _linears(True)]
    fused = FusedLinear(layers)
    assert not fused.prepacked
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    for out, layer in zip(fused(x), layers):
        torch.testing.assert_close(out, layer(x), rtol=1e-12, atol=1e-12)
