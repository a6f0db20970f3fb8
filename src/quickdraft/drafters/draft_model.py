"""Speculative sampling with a small draft model that shares the target's tokenizer (SpS: Leviathan et al.
2023; Chen et al. 2023).

The draft model keeps its own KV cache. Each step it catches up with the committed tokens (rolling back the
draft tokens the target rejected, which costs nothing in a static cache) and then generates ``budget``
tokens one at a time with the request's own sampling parameters, recording the distribution each token was
drawn from so that rejection sampling stays exact.
"""

from __future__ import annotations

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import TargetModel, TargetSession
from quickdraft.sampling import probabilities, sample
from quickdraft.types import DraftTree


@register("draft")
class DraftModelDrafter(Drafter):
    """Options: ``model`` (a path, or an already loaded :class:`TargetModel`), ``dtype`` (default: the
    target's), ``max_len`` (draft cache capacity, default: the target's context)."""

    option_names = frozenset({"model", "dtype", "max_len"})

    def __init__(self, model: TargetModel, max_len: int) -> None:
        self.model = model
        self.max_len = max_len
        self._session: TargetSession | None = None
        self._cached: list[int] = []

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> DraftModelDrafter:
        options = dict(setup.options)
        source = options.pop("model", None)
        if source is None:
            raise InvalidRequestError("the draft drafter needs a draft model: --drafter-option model=PATH")
        draft = source if isinstance(source, TargetModel) else _load_draft(source, setup, options.pop("dtype", None))
        if draft.vocab_size != setup.target.vocab_size:
            raise InvalidRequestError(
                f"draft model vocabulary ({draft.vocab_size}) differs from the target's "
                f"({setup.target.vocab_size}); use --drafter xvocab for a draft model with another tokenizer"
            )
        return cls(draft, int(options.pop("max_len", setup.target.max_context)))

    def begin(self, ctx: DraftContext) -> None:
        self._session = self.model.new_session(self.max_len)
        self._cached = []

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        if self._session is None:
            self.begin(ctx)
        logits = self._catch_up(ctx.tokens)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for step in range(budget):
            probs = probabilities(logits, ctx.params)
            token = int(probs.argmax()) if ctx.params.greedy else sample(probs, ctx.generator)
            tokens.append(token)
            rows.append(probs)
            if step + 1 < budget:
                logits = self._session.extend([token])
                self._cached.append(token)
        draft_probs = None if ctx.params.greedy else torch.stack(rows)
        return DraftTree.chain(tokens, draft_probs)

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Make the draft cache hold ``tokens`` (keeping the common prefix); return the logits after them."""
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        self._session.truncate(common)
        self._cached = list(tokens)
        return self._session.extend(tokens[common:])

    def end(self) -> None:
        if self._session is not None:
            self._session.close()
        self._session = None
        self._cached = []


def _load_draft(path: str, setup: DrafterSetup, dtype: str | None) -> TargetModel:
    from quickdraft.models.loading import load_draft_model

    return load_draft_model(path, dtype or setup.target.dtype, setup.target.device).target

