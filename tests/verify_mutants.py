"""Deliberately wrong sampling verifiers ("mutants"): the statistical tests of ``test_verify.py`` must catch them.

A mutant is the real :func:`quickdraft.verify.verify_sampling` with exactly one source line replaced, compiled in
``quickdraft.verify``'s own namespace, so everything else on its code path is the real code. The replaced line
must occur exactly once, verbatim (leading spaces aside), in ``verify_sampling``: if verify.py changes it, building
the mutant raises instead of silently testing code that no longer exists.

Terms: ``p`` is the target's distribution at the node being verified (``target_probs[row]``), updated to the
residual ``norm(max(p - q, 0))`` after each rejected child; ``q`` is the draft distribution of the child being
tried (a one-hot point mass for a deterministic drafter, whose tree has ``draft_probs is None``).
"""

from __future__ import annotations
import __future__

import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from quickdraft import verify
from quickdraft.types import DraftTree, SamplingParams, VerifyResult

Verifier = Callable[[DraftTree, torch.Tensor, SamplingParams, "torch.Generator | None"], VerifyResult]


def draft_probs_at_another_temperature(q: torch.Tensor, exponent: float = 1.5) -> torch.Tensor:
    """The drafter's ``q = softmax(l / T)`` recomputed at temperature ``T / exponent``: ``norm(q ** exponent)``.

    A point mass stays the same point mass."""
    sharpened = q**exponent
    return sharpened / sharpened.sum()


@dataclass(frozen=True)
class Mutant:
    """``verify_sampling`` with the line ``original`` replaced by ``replacement``; ``helpers`` are extra names
    the replacement refers to."""

    name: str
    original: str
    replacement: str
    helpers: dict[str, Any] = field(default_factory=dict)

    def verifier(self) -> Verifier:
        source = textwrap.dedent(inspect.getsource(verify.verify_sampling))
        lines = source.splitlines()
        matches = [i for i, line in enumerate(lines) if line.strip() == self.original]
        if len(matches) != 1:
            raise LookupError(f"mutant {self.name!r}: {self.original!r} occurs {len(matches)} times in verify_sampling")
        line = lines[matches[0]]
        lines[matches[0]] = line[: len(line) - len(line.lstrip())] + self.replacement
        namespace = {**vars(verify), **self.helpers}
        code = compile("\n".join(lines), f"<mutant {self.name}>", "exec",
                       flags=__future__.annotations.compiler_flag, dont_inherit=True)
        exec(code, namespace)
        return namespace["verify_sampling"]


MUTANTS = [
    Mutant("always-accept", "ratio = _acceptance_ratio(p[token], q[token])", "ratio = 1.0"),
    Mutant("bonus-from-target-not-residual", "bonus = sample(p, generator)",
           "bonus = sample(target_probs[row], generator)"),
    # Each sibling is tested against the node's original p, not against the residual its rejected elder
    # siblings left (the residual itself is still updated, so the bonus is right).
    Mutant("sibling-tested-against-original-p", "ratio = _acceptance_ratio(p[token], q[token])",
           "ratio = _acceptance_ratio(target_probs[row][token], q[token])"),
    # Each residual is taken from the node's original p: only the last rejected sibling is removed from it.
    Mutant("rejected-siblings-return-to-residual", "p = _residual(p, q)", "p = _residual(target_probs[row], q)"),
    Mutant("draft-probs-at-another-temperature", "q = _draft_distribution(tree, child, p.shape[-1])",
           "q = draft_probs_at_another_temperature(_draft_distribution(tree, child, p.shape[-1]))",
           {"draft_probs_at_another_temperature": draft_probs_at_another_temperature}),
    # Below the root, a node's children are judged by the target row of the node before it (its parent in a chain).
    Mutant("target-row-off-by-one", "p = target_probs[row]", "p = target_probs[max(row - 1, 0)]"),
    # This one passed the whole fast suite before the point-mass families of test_verify.py existed.
    Mutant("point-mass-residual-skipped", "p = _residual(p, q)",
           "p = p if tree.draft_probs is None else _residual(p, q)"),
]
