"""vLLM as a peer in ``quickdraft bench``: methods ``vllm``, ``vllm-ngram`` and ``vllm+NAME``.

Terms:

- ``vllm``: vLLM's plain decoding; ``vllm-ngram``: vLLM's own n-gram speculation (``num_speculative_tokens``
  :data:`DEFAULT_SPEC_TOKENS`, lookup :data:`NGRAM_LOOKUP`); ``vllm+NAME``: quickdraft's token-only drafter
  ``NAME`` inside vLLM (:mod:`quickdraft.integrations.vllm`), with ``num_speculative_tokens``
  :data:`DEFAULT_SPEC_TOKENS` or ``N`` in ``vllm+NAME@N``.
- **vLLM environment**: vLLM pins its own torch and transformers, so it lives in ``.venv-vllm`` (``make
  setup-vllm``); ``$QUICKDRAFT_VLLM_PYTHON`` names another interpreter.
- **worker**: a process of that environment (:mod:`quickdraft.bench.vllm_worker`) holding one vLLM ``LLM``
  (vLLM fixes the speculative method when it builds one), so one worker per method. Workers start when the
  runners are built and load concurrently; a runner waits for its worker at its first generation.

Each generation is timed inside the worker around ``LLM.generate`` on the tokenized prompt (prefill and
decode, like every runner), without prefix caching; vLLM stops on the engine's end-of-sequence ids. vLLM
runs greedy decoding only here: sampling is refused before anything loads.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from quickdraft.bench.outputs import MethodOutput, cut_at_eos
from quickdraft.errors import InvalidRequestError, QuickdraftError
from quickdraft.types import SamplingParams

PLAIN, NGRAM, QUICKDRAFT = "vllm", "vllm-ngram", "vllm+"
DEFAULT_SPEC_TOKENS = 5
#: vLLM ngram's (prompt_lookup_min, prompt_lookup_max).
NGRAM_LOOKUP = (2, 4)
#: Longest prompt plus answer a worker serves, and the KV cache it reserves (enough for one such sequence).
MAX_MODEL_LEN = 4096
KV_CACHE_BYTES = 256 << 20
SETUP_HINT = "run `make setup-vllm` (creates .venv-vllm) or set QUICKDRAFT_VLLM_PYTHON"
#: Lines of a dead worker's log quoted in the error.
LOG_TAIL_LINES = 15
#: vLLM versions the workers of this process reported (the report records them).
VERSIONS: set[str] = set()


class VllmPeerError(QuickdraftError):
    """A vLLM worker failed to start or to answer."""


@dataclass(frozen=True)
class VllmMethod:
    """A parsed vLLM method name: ``drafter`` is quickdraft's drafter for ``vllm+NAME`` (else None), ``k``
    the speculative tokens (None for plain decoding)."""

    name: str
    kind: str
    drafter: str | None = None
    k: int | None = None

    def speculative_config(self) -> dict[str, Any] | None:
        """vLLM's ``speculative_config`` for this method."""
        from quickdraft.integrations.vllm import proposer_path

        if self.kind == PLAIN:
            return None
        if self.kind == NGRAM:
            low, high = NGRAM_LOOKUP
            return {"method": "ngram", "num_speculative_tokens": self.k, "prompt_lookup_min": low,
                    "prompt_lookup_max": high}
        return {"method": "custom_class", "model": proposer_path(self.drafter or ""), "num_speculative_tokens": self.k}


def is_vllm_method(name: str) -> bool:
    """Whether ``name`` names a vLLM method (``vllm``, ``vllm-ngram``, ``vllm+NAME``, with ``@N``)."""
    base = name.partition("@")[0]
    return base in (PLAIN, NGRAM) or base.startswith(QUICKDRAFT)


def parse_vllm_method(name: str) -> VllmMethod:
    """Parse a vLLM method name; raises InvalidRequestError naming the valid forms."""
    from quickdraft.integrations.vllm import PROPOSERS

    base, at, budget = name.partition("@")
    if at and (base in (PLAIN, NGRAM) or not budget.isdigit() or int(budget) < 1):
        raise InvalidRequestError(f"method {name!r}: only vllm+NAME takes @N (num_speculative_tokens, an integer "
                                  f">= 1), e.g. vllm+suffix@8")
    k = int(budget) if at else DEFAULT_SPEC_TOKENS
    if base == PLAIN:
        return VllmMethod(name, PLAIN)
    if base == NGRAM:
        return VllmMethod(name, NGRAM, k=k)
    drafter = base[len(QUICKDRAFT):] if base.startswith(QUICKDRAFT) else ""
    if drafter not in PROPOSERS:
        raise InvalidRequestError(f"unknown vLLM method {name!r}; choose vllm, vllm-ngram or vllm+NAME with NAME "
                                  f"one of quickdraft's token-only drafters: {', '.join(PROPOSERS)}")
    return VllmMethod(name, QUICKDRAFT, drafter, k)


def vllm_python() -> Path:
    """The vLLM environment's interpreter: ``$QUICKDRAFT_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the
    current folder or in the quickdraft checkout this module belongs to."""
    if os.environ.get("QUICKDRAFT_VLLM_PYTHON"):
        return Path(os.environ["QUICKDRAFT_VLLM_PYTHON"])
    candidates = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        python = root / ".venv-vllm" / "bin" / "python"
        if python.exists():
            return python
    return candidates[-1] / ".venv-vllm" / "bin" / "python"


def check_vllm_method(name: str, params: SamplingParams | None = None,
                      options: dict[str, Any] | None = None) -> VllmMethod:
    """Fail before any model loads: a bad name, sampling, a missing vLLM environment, or a drafter option
    that the proposer would refuse at start-up."""
    method = parse_vllm_method(name)
    if params is not None and not params.greedy:
        raise InvalidRequestError(f"method {name!r} runs greedy decoding only; use --temperature 0 or leave "
                                  f"the vLLM methods out")
    if not vllm_python().exists():
        raise InvalidRequestError(f"method {name!r} needs vLLM's environment at {vllm_python()}: {SETUP_HINT}")
    if method.drafter:
        from quickdraft.integrations.vllm import drafter_factory

        drafter_factory(method.drafter, options or {})
    return method


class VllmWorker:
    """One worker process (see the module docstring), started now; :meth:`ready` waits until it has loaded."""

    def __init__(self, config: dict[str, Any], python: Path | None = None) -> None:
        self.config = config
        self.log = tempfile.NamedTemporaryFile("w+", prefix="quickdraft-vllm-", suffix=".log", delete=False)
        command = [str(python or vllm_python()), "-m", "quickdraft.bench.vllm_worker", json.dumps(config)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, bufsize=1)
        self.version: str | None = None
        atexit.register(self.close)

    def ready(self) -> str:
        """Wait for the worker to load; returns vLLM's version."""
        if self.version is None:
            reply = self._reply()
            self.version = str(reply["vllm"])
            VERSIONS.add(self.version)
        return self.version

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int]) -> dict[str, Any]:
        """One timed generation: ``{"token_ids": [...], "seconds": S}``."""
        self.ready()
        request = {"prompt_ids": [int(t) for t in prompt_ids], "max_new_tokens": int(max_new_tokens),
                   "stop_ids": [int(t) for t in stop_ids]}
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise VllmPeerError(self._died("stopped")) from None
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        """The worker's next protocol line; raises VllmPeerError for an error reply or a dead worker."""
        stream: IO[str] | None = self.process.stdout
        line = stream.readline() if stream is not None else ""
        if not line:
            raise VllmPeerError(self._died("exited"))
        reply = json.loads(line)
        if "error" in reply:
            raise VllmPeerError(f"vLLM worker ({self._label()}): {reply['error']}")
        return reply

    def _died(self, what: str) -> str:
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"vLLM worker ({self._label()}) {what} without an answer; the end of its log {self.log.name}:\n" + \
            "\n".join(tail)

    def _label(self) -> str:
        spec = self.config.get("speculative_config") or {}
        return str(spec.get("model") or spec.get("method") or "plain")

    def close(self) -> None:
        """End the worker (it exits when its input closes); its log is removed when it ended cleanly."""
        if self.process.poll() is None:
            try:
                if self.process.stdin:
                    self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()
        if self.process.returncode == 0:
            Path(self.log.name).unlink(missing_ok=True)


class VllmRunner:
    """A bench runner on a :class:`VllmWorker`; returns the tokens before the first end-of-sequence token."""

    def __init__(self, name: str, worker: VllmWorker, eos_ids: Iterable[int]) -> None:
        self.name = name
        self.worker = worker
        self.eos_ids = sorted(int(t) for t in eos_ids)

    def run(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams) -> MethodOutput:
        if not params.greedy:
            raise InvalidRequestError(f"method {self.name!r} runs greedy decoding only (temperature 0)")
        reply = self.worker.generate(prompt_ids, max_new_tokens, self.eos_ids)
        return MethodOutput(token_ids=cut_at_eos(reply["token_ids"], self.eos_ids), seconds=float(reply["seconds"]))


def build_vllm_runner(name: str, model_path: str, dtype: str, eos_ids: Iterable[int],
                      options: dict[str, Any] | None = None, seed: int | None = None) -> VllmRunner:
    """A runner for vLLM method ``name`` on the engine's model (a GGUF file is converted in the worker)."""
    method = parse_vllm_method(name)
    config = {"model": model_path, "dtype": dtype, "seed": seed or 0, "max_model_len": MAX_MODEL_LEN,
              "kv_cache_bytes": KV_CACHE_BYTES, "speculative_config": method.speculative_config(),
              "drafter_options": options or {}}
    return VllmRunner(name, VllmWorker(config), eos_ids)


def vllm_summary(run: Any) -> dict[str, Any]:
    """The report's ``vllm`` entry: vLLM's version and, per vLLM method, how many answers equal ``vllm``'s
    (plain vLLM decoding is the reference a speculative vLLM method must match)."""
    summary: dict[str, Any] = {"version": ", ".join(sorted(VERSIONS)) or None,
                               "python": str(vllm_python()),
                               "spec_tokens_default": DEFAULT_SPEC_TOKENS, "ngram_lookup": list(NGRAM_LOOKUP)}
    reference = run.outputs(PLAIN) if PLAIN in run.methods else {}
    identical: dict[str, dict[str, int]] = {}
    for method in run.methods:
        if is_vllm_method(method) and method != PLAIN and reference:
            outputs = run.outputs(method)
            same = sum(outputs[key].token_ids == reference[key].token_ids for key in outputs if key in reference)
            identical[method] = {"identical_to_vllm": same, "total": len(outputs)}
    summary["identical_to_vllm"] = identical
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the console: vLLM's version and each vLLM method's answers identical to ``vllm``'s."""
    counts = ", ".join(f"{m} {c['identical_to_vllm']}/{c['total']}" for m, c in summary["identical_to_vllm"].items())
    return f"vLLM {summary['version']}; answers identical to vllm's: {counts or '-'}"
