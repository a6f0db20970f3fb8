"""The OpenAI wire format: request validation and response bodies.

Requests are validated by pydantic models (:class:`CompletionRequest`, :class:`ChatRequest`), in strict mode
(no coercion: ``"10"`` is not an integer, ``true`` is not a number); :func:`parse_completion` and
:func:`parse_chat` turn the first problem pydantic finds into OpenAI's error JSON,
``{"error": {"message", "type", "param", "code"}}``, naming the offending parameter (``param``, a path such
as ``messages[0].role``) with one of these codes: ``missing_required_parameter``, ``unknown_parameter``,
``unsupported_parameter``, ``invalid_type``, ``invalid_value``, ``unsupported_content`` (all 400) and
``model_not_found`` (404).

Choices documented for clients:

- A JSON ``null`` is the same as leaving the parameter out.
- ``max_tokens`` (``max_completion_tokens`` for chat) must be an integer >= 1; a value larger than what fits
  in the context after the prompt is refused with 400 ``context_length_exceeded`` naming the context length
  and the prompt's length (as OpenAI and vLLM do). Omitted: up to 16 tokens for completions (OpenAI's
  default), the rest of the context for chat; an omitted limit never fails, it shrinks to the room left.
- ``temperature`` in [0, 2] (default 1, 0 = greedy), ``top_p`` in (0, 1]; ``top_k`` and ``min_p`` are accepted
  as extensions. Sampling is lossless under speculation for every combination.
- ``n`` must be 1; ``presence_penalty`` / ``frequency_penalty`` must be 0; ``logprobs``, ``tools``, ``echo``,
  ``best_of > 1``, ``suffix``, ``logit_bias`` and the other features this server does not implement are
  rejected with 400 naming the parameter when set to anything but their neutral value (see the fields typed
  :data:`Neutral` below); unknown parameters are rejected too (OpenAI's "Unrecognized request argument").
- One prompt per request (a list of several prompts is rejected); token-id prompts are accepted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from quickdraft.engine import check_max_new_tokens, check_prompt
from quickdraft.errors import QuickdraftError
from quickdraft.types import SamplingParams

#: Most stop strings per request.
MAX_STOP = 16
#: Default max_tokens of /v1/completions (OpenAI's).
DEFAULT_COMPLETION_TOKENS = 16

ROLES = {"system", "user", "assistant", "developer"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _default_type(status: int) -> str:
    """OpenAI's error types: client errors (401 included) are ``invalid_request_error``."""
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


@dataclass
class ParsedRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    prompt: str | list[dict[str, Any]] | list[int]
    max_tokens: int | None
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False  # False: max_tokens is the default, which shrinks to fit the context

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"


def parse_completion(body: Any, served_models: set[str]) -> ParsedRequest:
    """A /v1/completions body, validated; :class:`APIError` names the first bad parameter."""
    return _validate(CompletionRequest, body, served_models).parsed()


def parse_chat(body: Any, served_models: set[str]) -> ParsedRequest:
    """A /v1/chat/completions body, validated; :class:`APIError` names the first bad parameter."""
    return _validate(ChatRequest, body, served_models).parsed()


def _validate(model: type[_Request], body: Any, served_models: set[str]) -> _Request:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(body, context={"served_models": served_models})
    except ValidationError as error:
        raise _api_error(error.errors(include_url=False)[0]) from None


# ---------------------------------------------------------------------- field types
#
# A validator refuses a value by raising PydanticCustomError whose type is the API's error code (or one of
# the pydantic error types that _api_error translates); the message of an API code is sent as it is.


def check(valid: Callable[[Any], bool], message: str, code: str = "invalid_value") -> AfterValidator:
    """Refuse a value for which ``valid`` is false with error ``code``; ``{value}`` in ``message`` is replaced
    by the value."""

    def validate(value: Any) -> Any:
        if not valid(value):
            raise PydanticCustomError(code, message.replace("{value}", _short(value)))
        return value

    return AfterValidator(validate)


def expect(description: str) -> WrapValidator:
    """For a union type: a value of none of its JSON types fails with ``invalid_type`` saying ``description``
    (e.g. "a string or an array of strings") instead of one error per member of the union."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            if all(problem["type"].endswith("_type") for problem in error.errors()):
                raise PydanticCustomError("invalid_type", "expected {expected}", {"expected": description}) from None
            raise

    return WrapValidator(validate)


def neutral(*values: Any) -> AfterValidator:
    """A parameter this server does not implement: accepted only when null or equal to one of ``values``
    (same JSON type and value: ``false`` is not ``0``), refused with ``unsupported_parameter`` otherwise."""

    def validate(value: Any) -> Any:
        if value is not None and not any(_json_type(value) == _json_type(v) and value == v for v in values):
            raise PydanticCustomError("neutral_only", "not supported", {"got": _short(value)})
        return value

    return AfterValidator(validate)


def _served_model(name: str, info: ValidationInfo) -> str:
    served = info.context["served_models"]
    if name not in served:
        raise PydanticCustomError("model_not_found", f"The model '{name}' does not exist; this server serves: "
                                                     f"{', '.join(sorted(served))}")
    return name


def engine_check(run: Callable[[Any, str], object]) -> AfterValidator:
    """Refuse a value that the engine's own check ``run(value, parameter name)`` refuses, with its message
    (``invalid_value``)."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        try:
            run(value, info.field_name)
        except QuickdraftError as error:
            raise PydanticCustomError("invalid_value", str(error)) from None
        return value

    return AfterValidator(validate)


#: A token limit, checked as the engine checks ``max_new_tokens`` (the message names the parameter).
_max_tokens = engine_check(check_max_new_tokens)
#: One :class:`SamplingParams` field (``top_p``, ``top_k``, ``min_p``), checked by the engine's own type.
_sampling_value = engine_check(lambda value, name: SamplingParams(**{name: value}))
#: A prompt, checked by :func:`~quickdraft.engine.check_prompt`; a completion's text is continued as it is,
#: so only a prompt with no characters (or no token ids) is empty.
_prompt = engine_check(lambda prompt, _: check_prompt(prompt, blank_is_empty=False))


def _one_prompt(prompt: Any) -> Any:
    """``["text"]`` and ``[[1, 2]]`` are one prompt; a list of several prompts is refused."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise PydanticCustomError("unsupported_parameter", "only one prompt per request is supported; "
                                                               "send one request per prompt")
        return prompt[0]
    return prompt


class TextPart(BaseModel):
    """A content part of a chat message; only text parts are supported (other fields are ignored)."""

    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


_TEXT_PARTS = TypeAdapter(list[TextPart])


def _join_text_parts(content: Any) -> Any:
    """An array of text parts as one string (anything else passes on to the type check)."""
    if not isinstance(content, list):
        return content
    try:
        parts = _TEXT_PARTS.validate_python(content)
    except ValidationError:
        raise PydanticCustomError("unsupported_content", "only text content parts ({'type': 'text', 'text': ...}) "
                                                         "are supported") from None
    return "".join(part.text for part in parts)


def _role(role: str) -> str:
    """A supported role; ``developer`` is OpenAI's newer name for ``system``."""
    if role not in ROLES:
        raise PydanticCustomError("invalid_value", f"'{role}' is not supported; use one of {sorted(ROLES)} "
                                                   "(tool calling is not supported)")
    return "system" if role == "developer" else role


def _seed(seed: int) -> int:
    """A 64-bit seed (signed or unsigned), folded into the non-negative 63 bits the sampler takes."""
    if not -(2**63) <= seed < 2**64:
        raise PydanticCustomError("invalid_value", "seed must fit in 64 bits")
    return seed % 2**63


def _stop_list(stop: str | list[str]) -> list[str]:
    """One stop string or at most MAX_STOP of them, as a list."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise PydanticCustomError("invalid_value",
                                  f"at most {MAX_STOP} stop strings are supported, got {len(stops)}")
    return stops


def _no_disabled_top_k(top_k: int) -> int:
    """vLLM's ``top_k = -1`` means what 0 means here: no top-k filter."""
    return 0 if top_k == -1 else top_k


#: A parameter accepted only at a neutral value: ``Annotated[Any, neutral(values)]``.
Neutral = Any
#: Accepted and ignored.
Ignored = Any
Model = Annotated[str, AfterValidator(_served_model)]
MaxTokens = Annotated[int, _max_tokens]
Temperature = Annotated[float, check(lambda t: 0 <= t <= 2, "temperature must be between 0 and 2 (0 = greedy), "
                                                            "got {value}")]
Stop = Annotated[str | list[str], expect("a string or an array of strings"), AfterValidator(_stop_list)]
Prompt = Annotated[str | list[int], expect("a string or a list of token ids"), _prompt,
                   BeforeValidator(_one_prompt)]
Content = Annotated[str, expect("a string or an array of text parts"), BeforeValidator(_join_text_parts)]


class _Object(BaseModel):
    """A JSON object of the API: strict types, unknown fields refused, ``null`` the same as omitted."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Object):
    include_usage: bool = False
    continuous_usage_stats: Ignored = None


def _only_when_streaming(options: StreamOptions, info: ValidationInfo) -> StreamOptions:
    if not info.data.get("stream"):
        raise PydanticCustomError("invalid_value", "stream_options is only allowed when stream is true")
    return options


class Message(BaseModel):
    """One chat message; fields other than these (``name``, ...) are ignored."""

    model_config = ConfigDict(strict=True)
    role: Annotated[str, AfterValidator(_role)]
    content: Content
    tool_calls: Annotated[Neutral, neutral([])] = None
    function_call: Annotated[Neutral, neutral()] = None


Messages = Annotated[list[Message], check(lambda messages: len(messages) > 0, "messages must be a non-empty array")]


class _Request(_Object):
    """What both endpoints take. Fields typed :data:`Neutral` are features this server does not implement."""

    model: Model
    temperature: Temperature = 1.0
    top_p: Annotated[float, _sampling_value] = 1.0
    top_k: Annotated[int, AfterValidator(_no_disabled_top_k), _sampling_value] = 0
    min_p: Annotated[float, _sampling_value] = 0.0
    seed: Annotated[int, AfterValidator(_seed)] | None = None
    stop: Stop = []
    n: Annotated[int, check(lambda n: n == 1, "n={value} is not supported: this server returns one choice per "
                                              "request; send n separate requests instead", "unsupported_parameter")] = 1
    stream: bool = False
    stream_options: Annotated[StreamOptions, AfterValidator(_only_when_streaming)] | None = None
    max_tokens: MaxTokens | None = None
    logit_bias: Annotated[Neutral, neutral({}, [], "")] = None
    presence_penalty: Annotated[Neutral, neutral(0)] = None
    frequency_penalty: Annotated[Neutral, neutral(0)] = None
    user: Ignored = None
    metadata: Ignored = None
    store: Ignored = None
    service_tier: Ignored = None
    safety_identifier: Ignored = None
    prompt_cache_key: Ignored = None

    def parsed(self) -> ParsedRequest:
        raise NotImplementedError

    def _parsed(self, chat: bool, prompt: Any, max_tokens: int | None, default_max_tokens: int | None
                ) -> ParsedRequest:
        """``max_tokens`` None: not given, ``default_max_tokens`` applies."""
        params = SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)
        include_usage = self.stream_options is not None and self.stream_options.include_usage
        given = max_tokens is not None
        return ParsedRequest(chat, self.model, prompt, max_tokens if given else default_max_tokens, params, self.stop,
                             self.stream, include_usage, given)


class CompletionRequest(_Request):
    """A /v1/completions body."""

    prompt: Prompt
    logprobs: Annotated[Neutral, neutral(False, 0)] = None
    echo: Annotated[Neutral, neutral(False)] = None
    best_of: Annotated[Neutral, neutral(1)] = None
    suffix: Annotated[Neutral, neutral("")] = None

    def parsed(self) -> ParsedRequest:
        return self._parsed(False, self.prompt, self.max_tokens, DEFAULT_COMPLETION_TOKENS)


class ChatRequest(_Request):
    """A /v1/chat/completions body; ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``."""

    messages: Messages
    max_completion_tokens: MaxTokens | None = None
    logprobs: Annotated[Neutral, neutral(False)] = None
    top_logprobs: Annotated[Neutral, neutral(0)] = None
    tools: Annotated[Neutral, neutral({}, [], "")] = None
    tool_choice: Annotated[Neutral, neutral("none")] = None
    functions: Annotated[Neutral, neutral({}, [], "")] = None
    function_call: Annotated[Neutral, neutral("none")] = None
    parallel_tool_calls: Ignored = None  # meaningless without tools
    response_format: Annotated[Neutral, neutral({"type": "text"})] = None
    modalities: Annotated[Neutral, neutral(["text"])] = None
    audio: Annotated[Neutral, neutral()] = None
    prediction: Annotated[Neutral, neutral()] = None
    reasoning_effort: Annotated[Neutral, neutral()] = None
    web_search_options: Annotated[Neutral, neutral()] = None

    def parsed(self) -> ParsedRequest:
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._parsed(True, messages, limit, None)


# ---------------------------------------------------------------------- validation errors

#: The JSON type a pydantic type error expected.
EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "a boolean",
            "list_type": "an array", "dict_type": "an object", "model_type": "an object",
            "model_attributes_type": "an object"}
#: Error codes a validator raises with its final message.
API_CODES = {"invalid_value", "unsupported_parameter", "unsupported_content", "model_not_found"}


def _api_error(problem: ErrorDetails) -> APIError:
    """One pydantic problem as OpenAI's error: status, message, ``param`` (the path of the field) and code."""
    kind, loc, ctx = problem["type"], problem["loc"], problem.get("ctx") or {}
    param = _path(loc) or None
    if kind == "extra_forbidden":
        parent, name = _path(loc[:-1]), loc[-1]
        if parent:
            return APIError(400, f"Unrecognized {parent} field: {name}", parent, "unknown_parameter")
        return APIError(400, f"Unrecognized request argument supplied: {name}", str(name), "unknown_parameter")
    if kind == "missing":
        return APIError(400, f"you must provide a {param} parameter", param, "missing_required_parameter")
    if kind == "neutral_only":
        return APIError(400, f"'{param}' is not supported by this server (got {ctx['got']}); omit it or leave it "
                             "at its default", param, "unsupported_parameter")
    if kind.endswith("_type"):
        expected = ctx.get("expected") or EXPECTED.get(kind, "another type")
        return APIError(400, f"Invalid type for '{param}': expected {expected}, but got "
                             f"{_json_type(problem['input'])}.", param, "invalid_type")
    if kind in API_CODES:
        message = problem["msg"] if len(loc) < 2 else f"{param}: {problem['msg']}"
        return APIError(404 if kind == "model_not_found" else 400, message, param, kind)
    return APIError(400, f"Invalid value for '{param}': {problem['msg']}", param, "invalid_value")


def _path(loc: tuple[int | str, ...]) -> str:
    """A field's location as the API names it: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------- responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: ParsedRequest, ident: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int, extra: dict | None = None) -> dict[str, Any]:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                  "logprobs": None, "finish_reason": finish_reason}
        body = {"id": ident, "object": "chat.completion", "created": created, "model": request.model,
                "system_fingerprint": None, "choices": [choice]}
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        body = {"id": ident, "object": "text_completion", "created": created, "model": request.model,
                "system_fingerprint": None, "choices": [choice]}
    body["usage"] = usage(prompt_tokens, completion_tokens)
    if extra:
        body["quickdraft"] = extra
    return body


class ChunkWriter:
    """Builds the ``data: {json}\\n\\n`` events of a streamed response, exactly as OpenAI sends them."""

    def __init__(self, request: ParsedRequest) -> None:
        self.request = request
        self.id = new_id(request.chat)
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if request.chat else "text_completion"

    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.request.model,
                "system_fingerprint": None, "choices": choices}
        if self.request.include_usage:
            body["usage"] = None
        return body

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if self.request.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes | None:
        """The chat stream's first chunk announces the role (completions have none)."""
        if not self.request.chat:
            return None
        return sse(self._chunk([self._choice("", None, role=True)]))

    def text(self, text: str) -> bytes:
        return sse(self._chunk([self._choice(text, None)]))

    def finish(self, finish_reason: str) -> bytes:
        return sse(self._chunk([self._choice(None if self.request.chat else "", finish_reason)]))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes | None:
        if not self.request.include_usage:
            return None
        body = self._chunk([])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return sse(body)


def sse(body: dict[str, Any]) -> bytes:
    import json

    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
