"""Verification: which draft tokens the target keeps, and the bonus token it adds.

The target's logits come as rows ``[N + 1, V]``: row 0 is the distribution after the root (the last
committed token), row ``i + 1`` the distribution after node ``i``. Terms (draft, accepted and bonus tokens)
are defined in :mod:`quickdraft.types`.

- :func:`verify_greedy` walks down the tree while a child matches the target's argmax. The committed tokens
  are exactly what plain greedy decoding would produce.
- :func:`verify_sampling` is lossless rejection sampling for chains (Leviathan et al. 2023; Chen et al. 2023)
  generalised to several candidates per node as in SpecInfer (Miao et al. 2024): at a node with target
  distribution ``p``, children ``x_1 .. x_m`` drawn from ``q_1 .. q_m`` are tried in order; ``x_j`` is accepted
  with probability ``min(1, p(x_j) / q_j(x_j))``, and after a rejection ``p`` becomes the residual
  ``norm(max(p - q_j, 0))``. If every child is rejected, the bonus token is drawn from the last residual.
  A deterministic drafter's token is a point mass ``q_j = onehot(x_j)``: it is accepted with probability
  ``p(x_j)`` and removed from ``p`` on rejection. Every committed token is then distributed exactly as the
  target's sampling distribution.
- :func:`verify_typical_lossy` is Medusa's typical acceptance. It is **not** lossless and is never a default.
"""

from __future__ import annotations

import torch

from quickdraft.sampling import probabilities, sample
from quickdraft.tree import children
from quickdraft.types import DraftTree, SamplingParams, VerifyResult


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> VerifyResult:
    """Accept the longest path whose tokens equal the target's argmax; the bonus is the next argmax."""
    targets = logits.argmax(dim=-1).tolist()
    kids = children(tree)
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    row = 0
    while True:
        match = next((c for c in kids[row] if tokens[c] == targets[row]), None)
        if match is None:
            break
        accepted.append(match)
        row = match + 1
    committed = [tokens[n] for n in accepted] + [targets[row]]
    return VerifyResult(accepted, committed, tree.size)


def verify_sampling(
    tree: DraftTree,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Lossless multi-candidate rejection sampling over ``tree`` (see the module docstring)."""
    if params.greedy:
        return verify_greedy(tree, logits)
    target_probs = probabilities(logits, params)
    kids = children(tree)
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    row = 0
    while True:
        p = target_probs[row]
        chosen = None
        for child in kids[row]:
            q = _draft_distribution(tree, child, p.shape[-1])
            token = tokens[child]
            ratio = _acceptance_ratio(p[token], q[token])
            if torch.rand((), generator=generator).item() < ratio:
                chosen = child
                break
            p = _residual(p, q)
        if chosen is None:
            bonus = sample(p, generator)
            return VerifyResult(accepted, [tokens[n] for n in accepted] + [bonus], tree.size)
        accepted.append(chosen)
        row = chosen + 1


def _draft_distribution(tree: DraftTree, node: int, vocab: int) -> torch.Tensor:
    if tree.draft_probs is None:
        q = torch.zeros(vocab)
        q[tree.tokens[node]] = 1.0
        return q
    return tree.draft_probs[node].float()


def _acceptance_ratio(p_token: torch.Tensor, q_token: torch.Tensor) -> float:
    q = float(q_token)
    if q <= 0:
        return 0.0
    return min(1.0, float(p_token) / q)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))``; if rounding leaves no mass, ``p`` itself (a zero-probability event)."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def verify_typical_lossy(
    tree: DraftTree,
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> VerifyResult:
    """Medusa's typical acceptance (LOSSY: output no longer follows the target distribution).

    A draft token is accepted when its target probability exceeds ``min(epsilon, delta * exp(-H(p)))``,
    where ``H(p)`` is the entropy of the target distribution; the longest accepted path wins, and the
    bonus token is sampled from the target."""
    if params.greedy:
        return verify_greedy(tree, logits)
    target_probs = probabilities(logits, params)
    entropy = -(target_probs * torch.log(target_probs.clamp_min(1e-12))).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    kids = children(tree)
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    row = 0
    while True:
        match = next((c for c in kids[row] if target_probs[row, tokens[c]] > threshold[row]), None)
        if match is None:
            break
        accepted.append(match)
        row = match + 1
    bonus = sample(target_probs[row], generator)
    return VerifyResult(accepted, [tokens[n] for n in accepted] + [bonus], tree.size)
