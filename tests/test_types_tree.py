import math

import pytest
import torch

from quickdraft.errors import InvalidRequestError
from quickdraft.tree import children, depth_first_order, depths, reordered, verification_mask, verification_positions
from quickdraft.types import DraftTree, SamplingParams


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"temperature": math.inf}, "finite"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"seed": "x"}, "seed"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_sampling_values_are_rejected_with_a_message(kwargs, fragment):
    with pytest.raises(InvalidRequestError, match=None) as info:
        SamplingParams(**kwargs)
    assert fragment in str(info.value)


def test_greedy_is_temperature_zero():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_from_paths_merges_shared_prefixes_in_order():
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9]
    assert tree.parents.tolist() == [-1, 0, 1, 0, -1]
    assert depths(tree).tolist() == [1, 2, 3, 2, 1]
    assert children(tree) == [[0, 4], [1, 3], [2], [], [], []]


def test_first_chain_follows_first_children():
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    chain = tree.first_chain()
    assert chain.tokens.tolist() == [5, 6, 7]
    assert chain.is_chain()


def test_truncated_keeps_a_valid_prefix_of_nodes():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4]])
    small = tree.truncated(2)
    assert small.tokens.tolist() == [1, 2] and small.parents.tolist() == [-1, 0]


def test_verification_mask_is_ancestor_or_self():
    tree = DraftTree.from_paths([[5, 6], [7]])  # nodes: 0:5 (root child), 1:6 (child of 0), 2:7 (root child)
    mask = verification_mask(tree)
    expected = torch.tensor(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert verification_positions(10, tree).tolist() == [10, 11, 12, 11]


def test_chain_mask_is_causal():
    tree = DraftTree.chain([3, 4, 5])
    assert torch.equal(verification_mask(tree), torch.ones(4, 4, dtype=torch.bool).tril())


def test_depth_first_order_puts_the_first_child_path_first_and_parents_before_children():
    # breadth-first: 0:a 1:b (root's children), 2:a1 3:a2 (a's), 4:b1 (b's), 5:a11 (a1's)
    tree = DraftTree(torch.tensor([10, 20, 11, 12, 21, 13]), torch.tensor([-1, -1, 0, 0, 1, 2]))
    assert depth_first_order(tree) == [0, 2, 5, 3, 1, 4]
    assert depth_first_order(DraftTree.chain([4, 5, 6])) == [0, 1, 2]
    assert depth_first_order(DraftTree.empty()) == []


def test_reordered_keeps_every_path_and_renumbers_parents():
    tree = DraftTree(torch.tensor([10, 20, 11, 12, 21, 13]), torch.tensor([-1, -1, 0, 0, 1, 2]),
                     torch.eye(6))
    order = depth_first_order(tree)
    laid = reordered(tree, order)
    assert laid.tokens.tolist() == [10, 11, 13, 12, 20, 21]
    assert laid.parents.tolist() == [-1, 0, 1, 0, -1, 4]
    assert torch.equal(laid.draft_probs, torch.eye(6)[order])

    def paths(t: DraftTree) -> set[tuple[int, ...]]:
        tokens, parents = t.tokens.tolist(), t.parents.tolist()
        result = set()
        for node in range(t.size):
            path = []
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            result.add(tuple(reversed(path)))
        return result

    assert paths(laid) == paths(tree)
