"""The process that runs vLLM for ``quickdraft bench`` (started with ``.venv-vllm/bin/python -m
quickdraft.bench.vllm_worker CONFIG``; see :mod:`quickdraft.bench.vllm_peer`).

``CONFIG`` is a JSON object: ``model`` (a model folder or GGUF file, converted by
:mod:`quickdraft.integrations.model_dir`), ``dtype``, ``seed``, ``max_model_len``, ``kv_cache_bytes``,
``speculative_config`` (vLLM's, or null for plain decoding) and ``drafter_options`` (for a quickdraft
proposer, passed in ``QUICKDRAFT_VLLM_OPTIONS``). The worker loads one vLLM ``LLM``, then answers on its
protocol stream, one JSON object per line:

- after loading: ``{"ready": true, "vllm": VERSION}``, or ``{"error": MESSAGE}`` and exit;
- per request line ``{"prompt_ids": [...], "max_new_tokens": N, "stop_ids": [...]}``: ``{"token_ids": [...],
  "seconds": S}`` where ``S`` is ``time.perf_counter`` around the ``LLM.generate`` call (prefill and decode
  of the already tokenized prompt, as every bench runner times), or ``{"error": MESSAGE}``.

The protocol stream is the process's original stdout; everything libraries print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from quickdraft.integrations.vllm import OPTIONS_ENV


def protocol_stream() -> IO[str]:
    """The original stdout for protocol lines; fd 1 is pointed at stderr so that library output cannot
    corrupt the protocol."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return stream


def load(config: dict[str, Any]) -> Any:
    """vLLM's ``LLM`` for ``config`` (see the module docstring)."""
    from vllm import LLM

    from quickdraft.integrations.model_dir import vllm_model_dir

    os.environ[OPTIONS_ENV] = json.dumps(config.get("drafter_options") or {})
    return LLM(
        model=str(vllm_model_dir(config["model"])),
        dtype=config.get("dtype", "float32"),
        seed=int(config.get("seed") or 0),
        enforce_eager=True,
        enable_prefix_caching=False,  # like every other bench method: no KV reuse between calls
        max_model_len=int(config.get("max_model_len", 4096)),
        kv_cache_memory_bytes=int(config.get("kv_cache_bytes", 1 << 30)),
        speculative_config=config.get("speculative_config"),
        distributed_executor_backend="uni",
    )


def generate(llm: Any, request: dict[str, Any]) -> dict[str, Any]:
    """One greedy generation, timed around ``LLM.generate``."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=int(request["max_new_tokens"]),
                            stop_token_ids=list(request.get("stop_ids") or []))
    prompt = {"prompt_token_ids": list(request["prompt_ids"])}
    start = time.perf_counter()
    outputs = llm.generate([prompt], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"token_ids": list(outputs[0].outputs[0].token_ids), "seconds": seconds}


def serve(llm: Any, requests: IO[str], replies: IO[str]) -> None:
    """Answer request lines until ``requests`` ends."""
    for line in requests:
        if not line.strip():
            continue
        try:
            reply = generate(llm, json.loads(line))
        except Exception as error:  # reported to the bench, which raises a clear error
            reply = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    replies = protocol_stream()
    try:
        config = json.loads(args[0])
        check_proposer(config)
        llm = load(config)
        import vllm
    except Exception as error:  # start-up failures go back as one message, not a traceback
        replies.write(json.dumps({"error": start_error(error)}) + "\n")
        return 1
    replies.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")
    serve(llm, sys.stdin, replies)
    return 0


def start_error(error: BaseException) -> str:
    """A start-up error's message: quickdraft's own where one is in the chain of causes (vLLM wraps a
    proposer's error in its own), else the error's."""
    from quickdraft.errors import QuickdraftError

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, QuickdraftError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return f"{type(error).__name__}: {error}"


def check_proposer(config: dict[str, Any]) -> None:
    """Build a quickdraft proposer's drafter once before vLLM starts, so that a bad option is reported by
    its own message (vLLM's engine process would only log it)."""
    from quickdraft.integrations.vllm import PROPOSERS, drafter_factory

    spec = config.get("speculative_config") or {}
    path = str(spec.get("model") or "")
    for name, cls in PROPOSERS.items():
        if path.endswith(f".vllm.{cls}"):
            drafter_factory(name, config.get("drafter_options") or {})


if __name__ == "__main__":
    sys.exit(main())
