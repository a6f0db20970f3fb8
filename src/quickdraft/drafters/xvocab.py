"""Speculative decoding with a draft model whose tokenizer differs from the target's, at the string level.

Reference: Timor et al. 2025, "Accelerating LLM Inference with Lossless Speculative Decoding Algorithms for
Heterogeneous Vocabularies" (the string-level approach: draft tokens are decoded to text and the text is
re-tokenized with the target's tokenizer).

Terms (draft, accepted and bonus tokens: see :mod:`quickdraft.types`):

- **committed text**: the target tokenizer's decoding of the committed target tokens (special tokens
  left out). The prompt part is decoded once per request; the generated part each step.
- **draft ids**: the draft tokenizer's encoding of the committed text, the prompt part and the generated
  part encoded separately (so the prompt's draft ids never change within a request). The draft model's
  own KV cache holds a prefix of them.
- **draft text**: the text of the ``k`` tokens the draft model generates after the draft ids, decoded in
  context (a window of the preceding draft ids decoded with and without them) so that leading spaces and
  multi-token characters come out right; an incomplete trailing character is dropped.
- **boundary**: the end of the committed text, where the draft text starts. The draft text is mapped to
  target tokens by re-encoding ``tail + draft text``, where ``tail`` is the decoded text of the last
  ``window`` committed target tokens, and taking the tokens beyond the re-encoding of ``tail`` alone, when
  that re-encoding is a prefix of it (the boundary is stable). When the draft text merges with the end of
  the tail into one token, the draft text is encoded on its own instead. The last mapped token is dropped
  (it may be a piece of a longer token once more text follows), and the proposal is trimmed until
  decoding the committed tail followed by it gives the tail's text followed by a prefix of the draft text.

Each step the drafter (1) re-encodes the generated text in the draft tokenizer and rolls the draft cache
back to the longest common prefix with what it holds (rejected draft tokens, and any re-tokenization at
the boundary, cost a truncation), (2) feeds the rest and generates ``k`` draft tokens greedily, stopping at
the draft's EOS, (3) maps the draft text to target tokens as above and proposes them as a chain.

**Why this is lossless for any proposal.** The proposals carry ``draft_probs = None``: each is a point mass
``q = onehot(x)``. At a node where the target samples from ``p``, the verifier accepts ``x`` with probability
``min(1, p(x) / q(x)) = p(x)`` and otherwise samples from the residual ``norm(max(p - q, 0))``, which is
``p`` with ``x`` removed: ``p(y) / (1 - p(x))`` for ``y != x``. So the committed token is ``x`` with
probability ``p(x)`` and ``y != x`` with probability ``(1 - p(x)) * p(y) / (1 - p(x)) = p(y)``: exactly
``p``, whatever ``x`` was, as long as ``x`` does not depend on the verifier's own random draws. That holds
for a deterministic mapping of a greedy draft (used here) and equally for a sampled draft, so the draft's
vocabulary, its re-tokenization and its errors can only change how many tokens are accepted, never the
output distribution (or, for greedy requests, the output itself).
"""

from __future__ import annotations

from typing import Any

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import TargetModel, TargetSession
from quickdraft.types import DraftTree

#: Draft cache slots allocated at least, and the growth factor when a request needs more.
MIN_DRAFT_CAPACITY = 256
REPLACEMENT = "\ufffd"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (BOS) added."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def continuation_text(tokenizer: Any, context_ids: list[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after ``context_ids``, decoded in context; incomplete trailing characters
    (U+FFFD) are dropped."""
    head = decode(tokenizer, context_ids)
    full = decode(tokenizer, context_ids + new_ids)
    text = full[len(head):] if full.startswith(head) else decode(tokenizer, new_ids)
    return text.rstrip(REPLACEMENT)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    common = 0
    while common < limit and a[common] == b[common]:
        common += 1
    return common


def draft_text_to_target_tokens(
    tokenizer: Any, committed_ids: list[int], draft_text: str, window: int = 8, complete: bool = False
) -> list[int]:
    """Target tokens that continue ``committed_ids`` with (a prefix of) ``draft_text``; see the module
    docstring. ``complete``: the draft text ends the draft (EOS), so its last token is kept."""
    if not draft_text:
        return []
    tail_ids = list(committed_ids[-window:])
    tail_text = decode(tokenizer, tail_ids)
    tail_encoded = encode(tokenizer, tail_text)
    joined = encode(tokenizer, tail_text + draft_text)
    if joined[: len(tail_encoded)] == tail_encoded:
        candidates = joined[len(tail_encoded):]
    else:
        candidates = encode(tokenizer, draft_text)
    if not complete:
        candidates = candidates[:-1]
    return faithful_prefix(tokenizer, tail_ids, tail_text, draft_text, candidates)


def faithful_prefix(tokenizer: Any, tail_ids: list[int], tail_text: str, draft_text: str,
                    candidates: list[int]) -> list[int]:
    """The longest prefix of ``candidates`` that, decoded after ``tail_ids``, adds a prefix of
    ``draft_text`` to ``tail_text``."""
    for end in range(len(candidates), 0, -1):
        full = decode(tokenizer, tail_ids + candidates[:end])
        if full.startswith(tail_text) and draft_text.startswith(full[len(tail_text):]):
            return candidates[:end]
    return []


@register("xvocab")
class CrossVocabDrafter(Drafter):
    """Options: ``model`` (a path, ``default`` for the embedded SmolLM2, a loaded
    :class:`~quickdraft.models.loading.LoadedModel`, or a :class:`TargetModel` together with ``tokenizer``),
    ``tokenizer`` (the draft's tokenizer, when ``model`` is an object without one), ``dtype`` (when loading;
    default: the target's), ``k`` (draft tokens per step, default 6), ``window`` (committed target tokens
    re-tokenized at the boundary, default 8)."""

    option_names = frozenset({"model", "tokenizer", "dtype", "k", "window"})

    def __init__(self, draft: TargetModel, draft_tokenizer: Any, target_tokenizer: Any, k: int = 6,
                 window: int = 8) -> None:
        if k < 1 or window < 1:
            raise InvalidRequestError(f"xvocab: k and window must be >= 1, got k={k}, window={window}")
        self.draft = draft
        self.draft_tokenizer = draft_tokenizer
        self.target_tokenizer = target_tokenizer
        self.k = k
        self.window = window
        eos = getattr(draft_tokenizer, "eos_token_id", None)
        self.draft_eos = frozenset([eos] if isinstance(eos, int) else eos or [])
        self._reset()

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> CrossVocabDrafter:
        options = dict(setup.options)
        source = options.pop("model", None)
        if source is None:
            raise InvalidRequestError(
                "the xvocab drafter needs a draft model: --drafter-option model=PATH (or model=default)"
            )
        draft, tokenizer = _resolve_draft(source, options.pop("tokenizer", None), setup, options.pop("dtype", None))
        k, window = int(options.pop("k", 6)), int(options.pop("window", 8))
        return cls(draft, tokenizer, setup.tokenizer, k, window)

    def begin(self, ctx: DraftContext) -> None:
        self._reset()
        prompt = ctx.tokens[: ctx.prompt_len]
        self._prompt_tail = prompt[-self.window:]
        prompt_text = decode(self.target_tokenizer, prompt)
        self._prompt_draft_ids = list(self.draft_tokenizer(prompt_text)["input_ids"]) if prompt_text else []

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        if self._prompt_draft_ids is None:
            self.begin(ctx)
        ids = self._draft_ids(ctx)
        count = min(self.k, budget + 1)
        if not ids or not self._ensure_capacity(len(ids) + count):
            return DraftTree.empty()
        logits = self._catch_up(ids)
        new_ids, complete = self._generate(logits, count)
        text = continuation_text(self.draft_tokenizer, ids[-self.window:], new_ids)
        tokens = draft_text_to_target_tokens(self.target_tokenizer, ctx.tokens, text, self.window, complete)
        return DraftTree.chain(tokens[:budget])

    def end(self) -> None:
        if self._session is not None:
            self._session.close()
        self._reset()

    def _reset(self) -> None:
        self._session: TargetSession | None = None
        self._capacity = 0
        self._cached: list[int] = []
        self._prompt_tail: list[int] = []
        self._prompt_draft_ids: list[int] | None = None

    def _draft_ids(self, ctx: DraftContext) -> list[int]:
        """Draft ids of the committed text: the prompt's (fixed) followed by the generated text's."""
        generated = continuation_text(self.target_tokenizer, self._prompt_tail, ctx.tokens[ctx.prompt_len:])
        return self._prompt_draft_ids + encode(self.draft_tokenizer, generated)

    def _ensure_capacity(self, needed: int) -> bool:
        """Open (or grow) the draft session so that it holds ``needed`` tokens; False if the draft model's
        context cannot."""
        if needed > self.draft.max_context:
            return False
        if self._session is None or needed > self._capacity:
            if self._session is not None:
                self._session.close()
            self._capacity = min(self.draft.max_context, max(MIN_DRAFT_CAPACITY, 2 * needed))
            self._session = self.draft.new_session(self._capacity)
            self._cached = []
        return True

    def _catch_up(self, ids: list[int]) -> torch.Tensor:
        """Roll the draft cache back to its common prefix with ``ids`` and feed the rest (at least one
        token); return the logits after ``ids``."""
        common = common_prefix_length(self._cached, ids[:-1])
        self._session.truncate(common)
        self._cached = list(ids)
        return self._session.extend(ids[common:])

    def _generate(self, logits: torch.Tensor, count: int) -> tuple[list[int], bool]:
        """Up to ``count`` greedy draft tokens; True when the draft ended with EOS (not included)."""
        tokens: list[int] = []
        for step in range(count):
            token = int(logits.argmax())
            if token in self.draft_eos:
                return tokens, True
            tokens.append(token)
            if step + 1 < count:
                logits = self._session.extend([token])
                self._cached.append(token)
        return tokens, False


def _resolve_draft(source: Any, tokenizer: Any, setup: DrafterSetup, dtype: str | None) -> tuple[TargetModel, Any]:
    """The draft :class:`TargetModel` and its tokenizer from the ``model``/``tokenizer`` options."""
    from quickdraft.models.loading import LoadedModel, load_draft_model

    if isinstance(tokenizer, str):
        raise InvalidRequestError(
            "xvocab: pass tokenizer as an object (Python API); a draft model given by path brings its own"
        )
    if isinstance(source, LoadedModel):
        return source.target, tokenizer or source.tokenizer
    if isinstance(source, TargetModel):
        if tokenizer is None:
            raise InvalidRequestError("xvocab: a draft model passed as an object needs its tokenizer option")
        return source, tokenizer
    if not isinstance(source, str):
        raise InvalidRequestError(f"xvocab: model must be a path or a loaded model, got {type(source).__name__}")
    loaded = load_draft_model(source, dtype or setup.target.dtype, setup.target.device)
    return loaded.target, tokenizer or loaded.tokenizer
