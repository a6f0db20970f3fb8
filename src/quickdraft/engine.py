"""The decoding loop: propose -> verify -> commit -> observe.

One loop serves every method. Plain autoregressive decoding is the same loop with no drafter (every draft
tree is empty, so each target forward commits exactly the bonus token). The loop never branches on a
drafter's name: it reads the drafter's declared ``needs`` and the target session's capabilities.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from quickdraft.drafters import (
    DraftContext,
    Drafter,
    DrafterSetup,
    StepOutcome,
    check_drafter_options,
    create_drafter,
)
from quickdraft.budget import BudgetPolicy, EvidenceBudget
from quickdraft.detok import TextAssembler
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import TREE, TargetSession
from quickdraft.models.loading import LoadedModel, load_model
from quickdraft.models.quantized import DEFAULT_WEIGHTS
from quickdraft.sampling import choose, make_generator
from quickdraft.types import DraftTree, GenerationResult, GenerationStats, SamplingParams
from quickdraft.verify import verify_sampling

Messages = list[dict[str, str]]

#: Largest number of draft nodes the adaptive budget policy may verify in one step.
MAX_ADAPTIVE_BUDGET = 64


@dataclass
class StreamChunk:
    """Text released by one step of :meth:`Engine.stream` and the tokens committed in it."""

    text: str
    token_ids: list[int]


@dataclass
class GenerationRequest:
    """A tokenized request: prompt ids, sampling parameters and limits."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)


class Engine:
    """A target model, its tokenizer, and optionally a drafter.

    >>> engine = Engine.from_pretrained(drafter="ngram")   # the embedded SmolLM2-135M-Instruct
    >>> engine.generate("Write a haiku about autumn.", max_new_tokens=40).text
    """

    def __init__(self, loaded: LoadedModel, drafter: Drafter | None = None, draft_budget: int | None = None) -> None:
        """``draft_budget``: draft nodes verified per step; None chooses it per step with a
        :class:`~quickdraft.budget.BudgetPolicy` per drafter evidence level, fitted to the hardware's
        verification cost curve."""
        if draft_budget is not None and (not isinstance(draft_budget, int) or draft_budget < 1):
            raise InvalidRequestError(f"draft_budget must be an integer >= 1 or None (adaptive), got {draft_budget!r}")
        self.loaded = loaded
        self.drafter = drafter
        self.draft_budget = draft_budget
        self.eos_token_ids = _eos_token_ids(loaded)

    def budget_policy(self) -> EvidenceBudget | None:
        """A fresh adaptive policy for one request (the cost curve is measured once per loaded model), or
        None for a fixed budget. Each request starts from the same state, so a seeded request reproduces."""
        if self.drafter is None or self.draft_budget is not None:
            return None
        curve = self.loaded.cost_curve()
        return EvidenceBudget(lambda: BudgetPolicy(curve, max_budget=MAX_ADAPTIVE_BUDGET))

    @property
    def max_budget(self) -> int:
        if self.drafter is None:
            return 0
        return self.draft_budget or MAX_ADAPTIVE_BUDGET

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        drafter: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        drafter_options: dict[str, Any] | None = None,
        draft_budget: int | None = None,
        weights: str = DEFAULT_WEIGHTS,
    ) -> Engine:
        """Load ``model`` (None: the embedded default) and build ``drafter`` (None or "none": plain decoding).
        ``weights``: dense, int8, int4 or auto (:mod:`quickdraft.models.quantized`)."""
        check_drafter(drafter, drafter_options)
        loaded = load_model(model, dtype=dtype, device=device, weights=weights)
        return cls(loaded, _build_drafter(loaded, drafter, drafter_options), draft_budget)

    def with_drafter(self, drafter: str | None, drafter_options: dict[str, Any] | None = None,
                     draft_budget: int | None = None) -> Engine:
        """A new engine on the same loaded target with another drafter."""
        return Engine(self.loaded, _build_drafter(self.loaded, drafter, drafter_options), draft_budget)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.loaded.hf_model

    @property
    def model_path(self) -> str:
        return self.loaded.path

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.target.dtype

    @property
    def device(self) -> torch.device:
        return self.loaded.target.device

    @property
    def drafter_name(self) -> str:
        return self.drafter.name if self.drafter else "none"

    def encode_prompt(self, prompt: str | Messages) -> list[int]:
        """Token ids of a plain prompt, or of chat ``messages`` with the model's chat template applied."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("the prompt is empty; pass some text to continue")
            if getattr(self.tokenizer, "chat_template", None):
                prompt = [{"role": "user", "content": prompt}]
            else:
                return self.tokenizer(prompt)["input_ids"]
        _check_messages(prompt)
        if not getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer(plain_transcript(prompt))["input_ids"]
        ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def generate(self, prompt: str | Messages, max_new_tokens: int = 128, stop: list[str] | None = None,
                 **sampling: Any) -> GenerationResult:
        """Generate a reply; ``sampling`` takes the fields of :class:`SamplingParams`."""
        return self.generate_ids(self.encode_prompt(prompt), max_new_tokens, SamplingParams(**sampling), stop)

    def stream(self, prompt: str | Messages, max_new_tokens: int = 128, stop: list[str] | None = None,
               **sampling: Any) -> Iterator[StreamChunk]:
        """Yield text as it is committed; the last chunk may be empty."""
        request = self._request(self.encode_prompt(prompt), max_new_tokens, SamplingParams(**sampling), stop)
        run = _Run(self, request)
        yield from run.chunks()

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                     stop: list[str] | None = None) -> GenerationResult:
        request = self._request(prompt_ids, max_new_tokens, params or SamplingParams(), stop)
        run = _Run(self, request)
        for _ in run.chunks():
            pass
        return run.result()

    def start(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
              stop: list[str] | None = None) -> _Run:
        """A run whose ``chunks()`` streams and whose ``result()`` summarises (for servers and benches)."""
        return _Run(self, self._request(prompt_ids, max_new_tokens, params or SamplingParams(), stop))

    def _request(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop: list[str] | None) -> GenerationRequest:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; pass at least one token")
        check_max_new_tokens(max_new_tokens)
        context = self.loaded.target.max_context
        if len(prompt_ids) >= context:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                "shorten the prompt so that at least one new token fits"
            )
        return GenerationRequest(list(prompt_ids), min(max_new_tokens, context - len(prompt_ids)), params,
                                 list(stop or []))


class OutputTracker:
    """What a request keeps of its committed tokens: cut at EOS, at ``max_new_tokens`` and at stop strings,
    released as text when it can no longer change. The engine loop and the batch scheduler both use it."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], max_new_tokens: int,
                 stop: list[str] | None = None) -> None:
        self.assembler = TextAssembler(tokenizer, stop)
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.generated: list[int] = []
        self.finish_reason = "length"

    def commit(self, tokens: list[int]) -> tuple[StreamChunk, int]:
        """Apply EOS and the token limit to a step's committed tokens; return the released chunk and how
        many of ``tokens`` count as generated (up to and including an EOS token)."""
        kept: list[int] = []
        committed = 0
        for token in tokens:
            committed += 1
            if token in self.eos_token_ids:
                self.finish_reason = "stop"
                break
            kept.append(token)
            if len(self.generated) + len(kept) >= self.max_new_tokens:
                break
        self.generated.extend(kept)
        text = self.assembler.add(kept)
        if self.assembler.stopped:
            self.finish_reason = "stop"
        return StreamChunk(text, kept), committed

    @property
    def done(self) -> bool:
        return (self.finish_reason == "stop" or self.assembler.stopped
                or len(self.generated) >= self.max_new_tokens)

    def finish(self) -> str:
        """Release the text still held back (generation has ended)."""
        return self.assembler.finish()

    @property
    def text(self) -> str:
        return self.assembler.text


class _Run:
    """One request going through the loop."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self.drafter = engine.drafter
        self.policy = engine.budget_policy()
        self.output = OutputTracker(engine.tokenizer, engine.eos_token_ids, request.max_new_tokens, request.stop)
        self.stats = GenerationStats(drafter=engine.drafter_name)

    @property
    def assembler(self) -> TextAssembler:
        return self.output.assembler

    @property
    def generated(self) -> list[int]:
        return self.output.generated

    @property
    def finish_reason(self) -> str:
        return self.output.finish_reason

    def chunks(self) -> Iterator[StreamChunk]:
        target = self.engine.loaded.target
        request = self.request
        session = target.new_session(len(request.prompt_ids) + request.max_new_tokens + self.engine.max_budget + 1)
        generator = make_generator(request.params.seed, "cpu")
        needs = self.drafter.needs if self.drafter else frozenset()
        ctx = DraftContext(list(request.prompt_ids), len(request.prompt_ids), request.params, generator,
                           target=session if "target_session" in needs else None)
        try:
            yield from self._loop(session, ctx, generator, needs)
        finally:
            session.close()
            if self.drafter:
                self.drafter.end()

    def _loop(self, session: TargetSession, ctx: DraftContext, generator: torch.Generator,
              needs: frozenset[str]) -> Iterator[StreamChunk]:
        started = time.perf_counter()
        if self.drafter:
            self.drafter.begin(ctx)
        logits = session.prefill(ctx.tokens)
        first = choose(logits, self.request.params, generator)
        self.stats.prefill_seconds = time.perf_counter() - started
        self.stats.target_forwards = 1
        ctx.tokens.append(first)
        chunk = self._commit([first])
        yield chunk
        hidden_layers = self.drafter.hidden_layers if self.drafter and "hidden_states" in needs else ()
        while not self._done():
            drafting = time.perf_counter()
            evidence = self.drafter.evidence(ctx) if self.policy else 0
            budget = self._budget(evidence)
            tree = self._propose(ctx, session, budget)
            self.stats.draft_seconds += time.perf_counter() - drafting
            out = session.verify(ctx.tokens[-1], tree, hidden_layers)
            result = verify_sampling(tree, out.logits, self.request.params, generator)
            session.commit(result.accepted_nodes)
            if self.policy and tree.size:
                self.policy.observe(evidence, result.accepted_nodes, budget)
            self.stats.target_forwards += 1
            self.stats.drafted_tokens += tree.size
            self.stats.accepted_tokens += result.num_accepted
            ctx.tokens.extend(result.tokens)
            if self.drafter:
                observing = time.perf_counter()
                logits_for_drafter = out.logits if "target_logits" in needs else None
                self.drafter.observe(ctx, StepOutcome(tree, result, logits_for_drafter, out.hidden))
                self.stats.draft_seconds += time.perf_counter() - observing
            yield self._commit(result.tokens)
        self.stats.total_seconds = time.perf_counter() - started
        tail = self.output.finish()
        if tail:
            yield StreamChunk(tail, [])

    def _budget(self, evidence: int) -> int:
        """Draft nodes for the next step: never more than the tokens still wanted after the bonus token."""
        room = self.request.max_new_tokens - len(self.generated) - 1
        if not self.drafter or room <= 0:
            return 0
        if self.policy:
            return self.policy.choose(evidence, limit=room)
        return min(self.engine.draft_budget, room)

    def _propose(self, ctx: DraftContext, session: TargetSession, budget: int) -> DraftTree:
        if budget <= 0:
            return DraftTree.empty()
        tree = self.drafter.propose(ctx, budget).truncated(budget)
        if TREE not in session.capabilities and not tree.is_chain():
            tree = tree.first_chain()
        return tree

    def _commit(self, tokens: list[int]) -> StreamChunk:
        """Apply EOS and the token limit to a step's committed tokens and release their text."""
        chunk, committed = self.output.commit(tokens)
        self.stats.new_tokens += committed
        return chunk

    def _done(self) -> bool:
        return self.output.done

    def result(self) -> GenerationResult:
        return GenerationResult(self.assembler.text, list(self.generated), list(self.request.prompt_ids),
                                self.finish_reason, self.stats)


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (loaded.tokenizer.eos_token_id, getattr(loaded.hf_model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


def check_max_new_tokens(max_new_tokens: object, name: str = "max_new_tokens") -> None:
    """Fail unless ``max_new_tokens`` is an integer >= 1; ``name`` is what the message calls it (a CLI flag)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InvalidRequestError(f"{name} must be an integer >= 1, got {max_new_tokens!r}")


def check_drafter(drafter: str | None, options: dict[str, Any] | None) -> None:
    """Fail on an unknown drafter or option name before anything is loaded or built."""
    if drafter not in (None, "", "none"):
        check_drafter_options(drafter, options or {})


def _build_drafter(loaded: LoadedModel, name: str | None, options: dict[str, Any] | None) -> Drafter | None:
    if name in (None, "", "none"):
        return None
    return create_drafter(name, DrafterSetup(loaded.target, loaded.tokenizer, dict(options or {})))


def plain_transcript(messages: Messages) -> str:
    """Chat ``messages`` as text for a base model without a chat template: one ``Role: content`` paragraph
    per message, ending with ``Assistant:`` for the model to continue."""
    turns = [f"{m['role'].capitalize()}: {m['content'].strip()}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise InvalidRequestError(f"message {index} must be an object with a 'role' and a string 'content'")
    if not any(m["content"].strip() for m in messages):
        raise InvalidRequestError("every message is empty; give the model something to answer")
