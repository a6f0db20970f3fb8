"""The drafter interface: propose a tree of guesses, learn from what the target accepted.

A drafter declares in ``needs`` what it requires from the engine (never the other way round: the engine does
not branch on drafter names). Known needs:

- ``"target_logits"``: :class:`StepOutcome.logits` holds the target's logits for every verified row.
- ``"hidden_states"``: the target's hidden states (layers in ``hidden_layers``) are returned each step, and
  the prompt's are given to :meth:`Drafter.observe_prompt` (where the target session declares them).
- ``"target_session"``: :class:`DraftContext.target` is the target's session (self-speculation).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from quickdraft.models.base import TargetModel, TargetSession
from quickdraft.types import DraftTree, SamplingParams, VerifyResult


@dataclass
class DraftContext:
    """What a drafter sees of the sequence being generated.

    ``tokens`` are the prompt and every committed token so far; the last one is the root of the next tree.
    """

    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None = None
    target: TargetSession | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class StepOutcome:
    """One verification step as a drafter may learn from it."""

    tree: DraftTree
    result: VerifyResult
    logits: torch.Tensor | None = None  # [N + 1, V], when the drafter needs "target_logits"
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # when it needs "hidden_states"


@dataclass
class DrafterSetup:
    """What a drafter may use to build itself: the target, its tokenizer, and user options
    (``--drafter-option key=value`` on the command line, ``drafter_options`` in the API)."""

    target: TargetModel
    tokenizer: Any
    options: dict[str, Any] = field(default_factory=dict)


class Drafter(ABC):
    """Base class of every drafter. Subclasses register with :func:`quickdraft.drafters.register`."""

    name: ClassVar[str] = "?"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Target layers whose hidden states the drafter wants (with the "hidden_states" need).
    hidden_layers: tuple[int, ...] = ()

    #: The option names a user may set (``--drafter-option NAME=VALUE``); None means the constructor's
    #: keyword parameters. A drafter whose :meth:`from_setup` reads other names lists them here.
    option_names: ClassVar[frozenset[str] | None] = None

    @classmethod
    def accepted_options(cls) -> frozenset[str]:
        """The option names :meth:`from_setup` understands (see :attr:`option_names`)."""
        if cls.option_names is not None:
            return cls.option_names
        parameters = inspect.signature(cls.__init__).parameters.values()
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return frozenset(p.name for p in parameters if p.name != "self" and p.kind in keyword)

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> Drafter:
        """Build the drafter; the default passes the user's options as keyword arguments."""
        return cls(**setup.options)

    def begin(self, ctx: DraftContext) -> None:
        """A new request starts; ``ctx.tokens`` is its prompt."""

    def observe_prompt(self, ctx: DraftContext, hidden: dict[int, torch.Tensor]) -> None:
        """The prompt's hidden states ``{layer: [P, hidden]}`` (layers in ``hidden_layers``; layer ``-1`` for the
        last prompt token only), for a drafter that needs ``"hidden_states"`` on a session that declares them;
        called once after the prefill, when ``ctx.tokens`` already ends with the first generated token."""

    @abstractmethod
    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        """A tree of at most ``budget`` draft tokens continuing ``ctx.tokens`` (may be empty)."""

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Learn from a verification step; ``ctx.tokens`` already includes the committed tokens."""

    def evidence(self, ctx: DraftContext) -> int:
        """How strong the grounds for the next :meth:`propose` on ``ctx`` are, as a small integer (0: not
        said; the suffix drafter reports its match length). Called before :meth:`propose`: the budget policy
        and ``auto`` judge each level separately."""
        return 0

    def end(self) -> None:
        """The request is over: free per-request state (cross-request state may stay, bounded)."""
