"""Operations on :class:`~quickdraft.types.DraftTree`: depths, children, depth-first renumbering, the tree
attention mask, and which nodes a committed continuation followed."""

from __future__ import annotations

import torch

from quickdraft.types import DraftTree


def depths(tree: DraftTree) -> torch.Tensor:
    """Depth of each node: 1 for a child of the root, 2 for a grandchild, ..."""
    result = torch.zeros(tree.size, dtype=torch.long)
    parents = tree.parents.tolist()
    for i, parent in enumerate(parents):
        result[i] = 1 if parent < 0 else result[parent] + 1
    return result


def children(tree: DraftTree) -> list[list[int]]:
    """``children(tree)[0]`` lists the root's children; ``[i + 1]`` lists node ``i``'s, in sibling order."""
    result: list[list[int]] = [[] for _ in range(tree.size + 1)]
    for i, parent in enumerate(tree.parents.tolist()):
        result[parent + 1].append(i)
    return result


def depth_first_order(tree: DraftTree) -> list[int]:
    """The nodes in depth-first preorder, siblings in their order (best first): laid out in this order, the
    path of first children fills consecutive slots, and every node still comes after its parent."""
    below = children(tree)
    order: list[int] = []
    pending = below[0][::-1]
    while pending:
        node = pending.pop()
        order.append(node)
        pending.extend(below[node + 1][::-1])
    return order


def reordered(tree: DraftTree, order: list[int]) -> DraftTree:
    """``tree`` with its nodes renumbered: new node ``k`` is old node ``order[k]`` (parents first)."""
    index = torch.tensor(order, dtype=torch.long)
    renumber = torch.empty(tree.size + 1, dtype=torch.long)
    renumber[0] = -1
    renumber[index + 1] = torch.arange(tree.size)
    parents = renumber[tree.parents[index] + 1]
    probs = None if tree.draft_probs is None else tree.draft_probs[index]
    return DraftTree(tree.tokens[index], parents, probs)


def verification_mask(tree: DraftTree) -> torch.Tensor:
    """Attention mask among the rows of a verification forward: row 0 is the root (last committed
    token), row ``i + 1`` is node ``i``. ``mask[r, c]`` is True when row ``r`` may attend to row ``c``,
    i.e. ``c`` is ``r`` itself or one of its ancestors. Shape ``[N + 1, N + 1]``."""
    n = tree.size
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, parent in enumerate(tree.parents.tolist()):
        row = i + 1
        mask[row] = mask[parent + 1]
        mask[row, row] = True
    return mask


def verification_tokens(root_token: int, tree: DraftTree) -> torch.Tensor:
    """The input rows of a verification forward: the root token followed by the draft tokens."""
    return torch.cat([torch.tensor([root_token], dtype=torch.long), tree.tokens])


def verification_positions(start: int, tree: DraftTree) -> torch.Tensor:
    """Absolute positions of the verification rows when the root sits at position ``start``."""
    return torch.cat([torch.zeros(1, dtype=torch.long), depths(tree)]) + start


def matched_path(tree: DraftTree, committed: list[int]) -> list[int]:
    """The nodes of the root-to-node path of ``tree`` that spells the longest prefix of ``committed``, in order
    from the root (the first node that holds a token wins over a later duplicate sibling)."""
    child: dict[tuple[int, int], int] = {}
    for node, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        child.setdefault((parent, token), node)
    path: list[int] = []
    node = -1
    for token in committed:
        node = child.get((node, token), -2)
        if node == -2:
            break
        path.append(node)
    return path


def coverage(tree: DraftTree, committed: list[int]) -> int:
    """How many of ``committed`` (from the first) lie on one root-to-node path of ``tree``."""
    return len(matched_path(tree, committed))
