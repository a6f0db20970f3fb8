"""The engine: a loaded target model, its tokenizer and optionally a drafter, generating one request at a time.

A request is a batch of one going through the one decoding step of :mod:`quickdraft.decoding`: prefill, then
step (propose -> verify -> commit -> observe) until it is done. The step never branches on a drafter's name:
it reads the drafter's declared ``needs`` and the target session's capabilities.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from quickdraft.decoding import OutputTracker, Sequence, StreamChunk, cache_slots, prefill, step
from quickdraft.draft_budget import MAX_ADAPTIVE_BUDGET, DraftBudget, FixedBudget, RequestBudget
from quickdraft.drafters import Drafter, DrafterSetup, check_drafter_options, create_drafter
from quickdraft.errors import ContextLengthError, InvalidRequestError
from quickdraft.models.loading import LoadedModel, load_model
from quickdraft.models.quantized import DEFAULT_WEIGHTS
from quickdraft.types import GenerationResult, SamplingParams

Messages = list[dict[str, str]]


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
        self.eos_token_ids = frozenset(eos_token_ids(loaded.tokenizer, loaded.hf_model))

    def budget_policy(self) -> DraftBudget:
        """The draft budget policy of one request: fixed (``draft_budget``, or 0 without a drafter), or the
        single-request adaptive policy fitted to the loaded model's cost curve (measured once per model)."""
        if self.drafter is None or self.draft_budget is not None:
            return FixedBudget(self.draft_budget if self.drafter is not None else 0)
        return RequestBudget(self.loaded.cost_curve(), MAX_ADAPTIVE_BUDGET)

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
            check_prompt(prompt)
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
        yield from self.start(self.encode_prompt(prompt), max_new_tokens, SamplingParams(**sampling), stop).chunks()

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                     stop: list[str] | None = None) -> GenerationResult:
        generation = self.start(prompt_ids, max_new_tokens, params, stop)
        for _ in generation.chunks():
            pass
        return generation.result()

    def start(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
              stop: list[str] | None = None) -> Generation:
        """A :class:`Generation` whose ``chunks()`` decodes and streams and whose ``result()`` summarises."""
        return Generation(self, self._request(prompt_ids, max_new_tokens, params or SamplingParams(), stop))

    def _request(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 stop: list[str] | None) -> GenerationRequest:
        check_prompt(prompt_ids)
        check_max_new_tokens(max_new_tokens)
        limit = fit_to_context(len(prompt_ids), max_new_tokens, self.loaded.target.max_context)
        return GenerationRequest(list(prompt_ids), limit, params, list(stop or []))


class Generation:
    """One request decoded by an :class:`Engine`, as a batch of one: :meth:`chunks` prefills, then steps
    (:func:`quickdraft.decoding.step`) until the request is done, yielding the text each step releases (the
    last chunk may be empty); :meth:`result` summarises it afterwards."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self.engine = engine
        self.request = request
        self.budget = engine.budget_policy()
        output = OutputTracker(engine.tokenizer, engine.eos_token_ids, request.max_new_tokens, request.stop)
        self.sequence = Sequence(request.prompt_ids, request.params, output, engine.drafter_name)

    def chunks(self) -> Iterator[StreamChunk]:
        sequence = self.sequence
        slots = cache_slots(len(self.request.prompt_ids) + self.request.max_new_tokens, self.budget.max_budget)
        sequence.attach(self.engine.loaded.target.new_session(slots), self.engine.drafter)
        try:
            yield prefill(sequence)
            while not sequence.done:
                yield step([sequence], self.budget.choose([sequence])).chunks[0]
            sequence.stats.total_seconds = time.perf_counter() - sequence.started
            tail = sequence.output.finish()
            if tail:
                yield StreamChunk(tail, [])
        finally:
            sequence.session.close()
            sequence.release_drafter()

    def result(self) -> GenerationResult:
        return self.sequence.result()


def eos_token_ids(tokenizer: Any, hf_model: Any = None) -> list[int]:
    """The end-of-sequence ids of a model: the tokenizer's, then those of the model's generation config
    (one id or a list), each once."""
    config = getattr(hf_model, "generation_config", None)
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        for token in [source] if isinstance(source, int) else source or []:
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def check_prompt(prompt: str | list[int], blank_is_empty: bool = True) -> None:
    """Fail with :class:`InvalidRequestError` on an empty prompt: token ids, none; text, no characters, or
    with ``blank_is_empty`` (text that becomes the user's message) only whitespace. ``blank_is_empty=False``
    is for text continued as it is (the server's completions), where a space is a prompt."""
    if isinstance(prompt, str):
        if not (prompt.strip() if blank_is_empty else prompt):
            raise InvalidRequestError("the prompt is empty; pass some text to continue")
    elif not prompt:
        raise InvalidRequestError("the prompt is empty; pass at least one token")


def fit_to_context(prompt_tokens: int, max_new_tokens: int | None, context: int, clamp: bool = True,
                   where: str = "prompt") -> int:
    """The tokens a request may generate after a prompt of ``prompt_tokens`` in a ``context``-token model:
    ``max_new_tokens`` (None: all the room left), clamped to the room left, or with ``clamp=False`` refused
    when it does not fit (as the OpenAI API does; ``where`` names the prompt: "prompt" or "messages").
    Raises :class:`ContextLengthError` when not even one new token fits."""
    if prompt_tokens >= context:
        raise ContextLengthError(
            f"The {where} has {prompt_tokens} tokens but this model's context is {context}; shorten it so that "
            "at least one new token fits.")
    room = context - prompt_tokens
    if max_new_tokens is None:
        return room
    if max_new_tokens > room and not clamp:
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the {where}, {max_new_tokens} in the "
            f"completion). Please reduce the length of the {where} or completion.")
    return min(max_new_tokens, room)


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
