"""The OpenAI wire format: request validation and response bodies.

Requests are validated by hand (not by a schema library) so that every error names the offending parameter
and comes back in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.

Choices documented for clients:

- ``max_tokens`` (``max_completion_tokens`` for chat) must be an integer >= 1; a value larger than what fits
  in the context after the prompt is refused with 400 ``context_length_exceeded`` naming the context length
  and the prompt's length (as OpenAI and vLLM do). Omitted: up to 16 tokens for completions (OpenAI's
  default), the rest of the context for chat; an omitted limit never fails, it shrinks to the room left.
- ``temperature`` in [0, 2] (default 1, 0 = greedy), ``top_p`` in (0, 1]; ``top_k`` and ``min_p`` are accepted
  as extensions. Sampling is lossless under speculation for every combination.
- ``n`` must be 1; ``presence_penalty`` / ``frequency_penalty`` must be 0; ``logprobs``, ``tools``, ``echo``,
  ``best_of > 1``, ``suffix``, ``logit_bias`` and the other features this server does not implement are
  rejected with 400 naming the parameter when set to anything but their neutral value; unknown parameters
  are rejected too (OpenAI's "Unrecognized request argument").
- One prompt per request (a list of several prompts is rejected); token-id prompts are accepted.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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


# Parameters that are accepted only at their neutral value: name -> predicate "value is neutral".
def _null(value: Any) -> bool:
    return value is None


def _null_or_false(value: Any) -> bool:
    return value is None or value is False


def _null_or_empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value == ""


COMMON_NEUTRAL = {
    "logit_bias": _null_or_empty,
    "presence_penalty": lambda v: v is None or (_is_number(v) and v == 0),
    "frequency_penalty": lambda v: v is None or (_is_number(v) and v == 0),
}
COMPLETION_NEUTRAL = {
    **COMMON_NEUTRAL,
    "logprobs": lambda v: v is None or v is False or v == 0,
    "echo": _null_or_false,
    "best_of": lambda v: v is None or v == 1,
    "suffix": lambda v: v is None or v == "",
}
CHAT_NEUTRAL = {
    **COMMON_NEUTRAL,
    "logprobs": _null_or_false,
    "top_logprobs": lambda v: v is None or v == 0,
    "tools": _null_or_empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _null_or_empty,
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: True,  # meaningless without tools
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _null,
    "prediction": _null,
    "reasoning_effort": _null,
    "web_search_options": _null,
}
#: Accepted and ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
COMMON_HANDLED = {"model", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "n", "stream",
                  "stream_options", "max_tokens"}
COMPLETION_HANDLED = COMMON_HANDLED | {"prompt"}
CHAT_HANDLED = COMMON_HANDLED | {"messages", "max_completion_tokens"}


def parse_completion(body: Any, served_models: set[str]) -> ParsedRequest:
    body = _object(body)
    _check_parameters(body, COMPLETION_HANDLED, COMPLETION_NEUTRAL)
    model = _model(body, served_models)
    prompt = _completion_prompt(body)
    return _finish(body, False, model, prompt, _max_tokens(body, "max_tokens"), DEFAULT_COMPLETION_TOKENS)


def parse_chat(body: Any, served_models: set[str]) -> ParsedRequest:
    body = _object(body)
    _check_parameters(body, CHAT_HANDLED, CHAT_NEUTRAL)
    model = _model(body, served_models)
    messages = _messages(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return _finish(body, True, model, messages, _max_tokens(body, name), None)


def _finish(body: dict, chat: bool, model: str, prompt: Any, max_tokens: int | None,
            default_max_tokens: int | None) -> ParsedRequest:
    """The rest of the request; ``max_tokens`` None: not given, ``default_max_tokens`` applies."""
    params = _sampling(body)
    stop = _stop(body)
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise _type_error("n", "an integer", n)
        if n != 1:
            raise APIError(400, f"n={n} is not supported: this server returns one choice per request; send "
                                "n separate requests instead", "n", "unsupported_parameter")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options",
                           "invalid_value")
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        unknown = set(options) - {"include_usage", "continuous_usage_stats"}
        if unknown:
            raise APIError(400, f"Unrecognized stream_options field: {sorted(unknown)[0]}", "stream_options",
                           "unknown_parameter")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _type_error("stream_options.include_usage", "a boolean", include_usage)
    given = max_tokens is not None
    return ParsedRequest(chat, model, prompt, max_tokens if given else default_max_tokens, params, stop, stream,
                         include_usage, given)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", None, "invalid_json")
    return body


def _check_parameters(body: dict, handled: set[str], neutral: dict) -> None:
    for name, value in body.items():
        if name in handled or name in IGNORED:
            continue
        if name in neutral:
            if not neutral[name](value):
                raise APIError(400, f"'{name}' is not supported by this server (got {_short(value)}); "
                                    "omit it or leave it at its default", name, "unsupported_parameter")
            continue
        raise APIError(400, f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _model(body: dict, served: set[str]) -> str:
    if "model" not in body or body["model"] is None:
        raise APIError(400, "you must provide a model parameter", "model", "missing_required_parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model not in served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves: "
                            f"{', '.join(sorted(served))}", "model", "model_not_found")
    return model


def _completion_prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "you must provide a prompt", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty; pass some text to continue", "prompt", "invalid_value")
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "the prompt is empty; pass some text to continue", "prompt", "invalid_value")
        if all(_is_int(t) for t in prompt):
            return list(prompt)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise APIError(400, "only one prompt per request is supported; send one request per prompt",
                           "prompt", "unsupported_parameter")
    raise _type_error("prompt", "a string or a list of token ids", prompt)


def _messages(body: dict) -> list[dict[str, str]]:
    if "messages" not in body or body["messages"] is None:
        raise APIError(400, "you must provide messages", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise APIError(400, "messages must be a non-empty array", "messages", "invalid_value")
    result = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _type_error(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise APIError(400, f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role", "invalid_value")
        if role not in ROLES:
            raise APIError(400, f"{where}.role '{role}' is not supported; use one of {sorted(ROLES)} "
                                "(tool calling is not supported)", f"{where}.role", "invalid_value")
        if message.get("tool_calls") or message.get("function_call"):
            raise APIError(400, f"{where}: tool calls are not supported", f"{where}.tool_calls",
                           "unsupported_parameter")
        result.append({"role": "system" if role == "developer" else role,
                       "content": _content(message.get("content"), f"{where}.content")})
    return result


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                    "supported", where, "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(where, "a string or an array of text parts", content)


def _max_tokens(body: dict, name: str) -> int | None:
    """The limit the request gives, or None."""
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise _type_error(name, "an integer", value)
    if value < 1:
        raise APIError(400, f"{name} must be at least 1, got {value}", name, "invalid_value")
    return value


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2 (0 = greedy), got {temperature}",
                       "temperature", "invalid_value")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p", "invalid_value")
    min_p = _number(body, "min_p", 0.0)
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:
        top_k = 0
    if not _is_int(top_k) or top_k < 0:
        raise APIError(400, f"top_k must be an integer >= 0 (0 disables it), got {_short(top_k)}", "top_k",
                       "invalid_value")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise _type_error("seed", "an integer", seed)
        if not -(2**63) <= seed < 2**64:
            raise APIError(400, "seed must fit in 64 bits", "seed", "invalid_value")
        seed %= 2**63
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    except QuickdraftError as error:
        raise APIError(400, str(error), None, "invalid_value") from error


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _type_error(name, "a number", value)
    if not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number", name, "invalid_value")
    return float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are supported, got {len(stop)}", "stop",
                           "invalid_value")
        return list(stop)
    raise _type_error("stop", "a string or an array of strings", stop)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_error(name: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"Invalid type for '{name}': expected {expected}, but got {_json_type(value)}.", name,
                    "invalid_type")


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
