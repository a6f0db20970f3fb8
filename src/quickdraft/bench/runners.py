"""Method runners: one small object per benchmarked method, each timing its own generation the same way.

A runner has a ``name`` and ``run(prompt_ids, max_new_tokens, params) -> MethodOutput``. The prompt is
already tokenized, so the timed span (``time.perf_counter`` around the library call, with a device
synchronisation on each side) covers prefill and decode and nothing else. Every runner returns the new
tokens up to but excluding the first end-of-sequence token.

- ``ar`` and every drafter: :class:`EngineRunner`, an :class:`~quickdraft.engine.Engine` of its own (made
  with ``engine.with_drafter``, so all share one loaded target model but no drafter state). ``ar``'s engine
  (:func:`recording_engine`) sees the target through a :class:`~quickdraft.bench.top2.Top2Recorder`, which
  records the top-2 logits of each of its forwards for the divergence report; the host time spent recording
  is left out of ``ar``'s seconds;
- ``hf``, ``hf-pld``, ``hf-assisted``: :class:`HFRunner`, transformers ``generate`` on the engine's own
  transformers model (plain, ``prompt_lookup_num_tokens=10``, or with ``assistant_model``);
- ``llamacpp``: :class:`LlamaCppRunner`, llama-cpp-python's plain decoding of the same GGUF file;
- ``vllm``, ``vllm-ngram``, ``vllm+NAME``: :class:`~quickdraft.bench.vllm_peer.VllmRunner`, vLLM in a worker
  process of its own environment (:mod:`quickdraft.bench.vllm_peer`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quickdraft.bench.outputs import MethodOutput, MethodRunner, cut_at_eos
from quickdraft.bench.top2 import Top2Recorder
from quickdraft.devices import dtype_name, synchronize
from quickdraft.engine import Engine, eos_token_ids
from quickdraft.errors import InvalidRequestError
from quickdraft.models.loading import LoadedModel, load_draft_model
from quickdraft.types import SamplingParams

BASELINE = "ar"
PEERS = ("hf", "hf-pld", "hf-assisted", "llamacpp", "vllm", "vllm-ngram")
PLD_NUM_TOKENS = 10
LLAMACPP_INSTALL_HINT = "pip install llama-cpp-python (or pip install 'quickdraft[llamacpp]')"


def engine_target(engine: Any) -> Any:
    """The engine's :class:`~quickdraft.models.base.TargetModel` (``engine.target`` or
    ``engine.loaded.target``), or None if it exposes none."""
    target = getattr(engine, "target", None)
    if target is None:
        target = getattr(getattr(engine, "loaded", None), "target", None)
    return target if target is not None and hasattr(target, "new_session") else None


def engine_eos_ids(engine: Any) -> list[int]:
    """The end-of-sequence ids the engine stops on (``engine.eos_token_ids`` if it has them)."""
    ids = getattr(engine, "eos_token_ids", None)
    if ids:
        return sorted(int(t) for t in ids)
    return eos_token_ids(engine.tokenizer, engine.hf_model)


class EngineRunner:
    """quickdraft's own decoding (``ar``) or one drafter, on an Engine owned by this runner.

    With a ``recorder`` (the engine's target, wrapped: :func:`recording_engine`) each output carries the
    recorded top-2 logits, and the time spent recording them is not counted in its seconds.
    """

    def __init__(self, name: str, engine: Any, recorder: Top2Recorder | None = None) -> None:
        self.name = name
        self.engine = engine
        self.recorder = recorder

    def run(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams) -> MethodOutput:
        device = getattr(self.engine, "device", None)
        if self.recorder:
            self.recorder.reset()
        synchronize(device)
        start = time.perf_counter()
        result = self.engine.generate_ids(list(prompt_ids), max_new_tokens, params)
        synchronize(device)
        seconds = time.perf_counter() - start
        stats = result.stats
        return MethodOutput(
            token_ids=list(result.token_ids),
            seconds=seconds - (self.recorder.seconds if self.recorder else 0.0),
            target_forwards=stats.target_forwards,
            committed_tokens=stats.new_tokens,
            drafted_tokens=stats.drafted_tokens,
            draft_seconds=getattr(stats, "draft_seconds", None),
            top2=self.recorder.take() if self.recorder else None,
        )


def recording_engine(engine: Engine) -> tuple[Engine, Top2Recorder]:
    """A plain-decoding Engine on ``engine``'s loaded model whose target is wrapped in a
    :class:`~quickdraft.bench.top2.Top2Recorder`, and that recorder."""
    recorder = Top2Recorder(engine.loaded.target)
    return Engine(replace(engine.loaded, target=recorder)), recorder


class HFRunner:
    """transformers ``generate`` on the given model: plain, prompt lookup, or assisted by a draft model."""

    def __init__(
        self,
        name: str,
        hf_model: Any,
        tokenizer: Any,
        *,
        prompt_lookup_num_tokens: int | None = None,
        assistant_model: Any = None,
        assistant_tokenizer: Any = None,
        eos_ids: Iterable[int] | None = None,
    ) -> None:
        self.name = name
        self.model = hf_model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer, hf_model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.extra: dict[str, Any] = {}
        if prompt_lookup_num_tokens is not None:
            self.extra["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        if assistant_model is not None:
            self.extra["assistant_model"] = assistant_model
            if assistant_tokenizer is not None:  # a different vocabulary: universal assisted decoding
                self.extra["tokenizer"] = tokenizer
                self.extra["assistant_tokenizer"] = assistant_tokenizer

    def generate_kwargs(self, max_new_tokens: int, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": not params.greedy,
            "eos_token_id": self.eos_ids or None,
            "pad_token_id": self.pad_id,
            # Neutralise whatever the checkpoint's generation config sets, so every method decodes alike.
            "repetition_penalty": 1.0,
            "num_beams": 1,
        }
        if params.greedy:
            kwargs.update(temperature=None, top_k=None, top_p=None, min_p=None)
        else:
            kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
            kwargs["min_p"] = params.min_p if params.min_p > 0 else None
        kwargs.update(self.extra)
        return kwargs

    def run(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams) -> MethodOutput:
        device = self.model.device
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        attention_mask = torch.ones_like(input_ids)
        kwargs = self.generate_kwargs(max_new_tokens, params)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            synchronize(device)
            seconds = time.perf_counter() - start
        new = output[0, input_ids.shape[1] :].tolist()
        return MethodOutput(token_ids=cut_at_eos(new, self.eos_ids), seconds=seconds)


class LlamaCppRunner:
    """llama-cpp-python's plain decoding of a GGUF file (greedy at temperature 0)."""

    def __init__(
        self,
        gguf_path: str,
        *,
        eos_ids: Iterable[int] = (),
        n_ctx: int = 8192,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
        name: str = "llamacpp",
    ) -> None:
        llama_class = import_llama()
        if not str(gguf_path).endswith(".gguf") or not Path(gguf_path).is_file():
            raise InvalidRequestError(
                f"method 'llamacpp' needs the target to be a .gguf file, but the model was loaded from "
                f"{gguf_path!r}; pass --model FILE.gguf or drop llamacpp from --methods"
            )
        self.name = name
        self.n_ctx = n_ctx
        self.llm = llama_class(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=n_threads or torch.get_num_threads(),
            n_gpu_layers=n_gpu_layers,
            seed=seed if seed is not None else 0,
            verbose=False,
        )
        self.eos_ids = set(eos_ids) | {int(self.llm.token_eos())}

    def run(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams) -> MethodOutput:
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise InvalidRequestError(
                f"llamacpp context is {self.n_ctx} tokens but a prompt of {len(prompt_ids)} tokens plus "
                f"{max_new_tokens} new tokens needs more; lower --max-new-tokens"
            )
        self.llm.reset()  # no KV prefix reuse from the previous call
        if params.seed is not None:
            self.llm.set_seed(params.seed)
        tokens: list[int] = []
        start = time.perf_counter()
        if max_new_tokens > 0:
            for token in self.llm.generate(
                list(prompt_ids),
                temp=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=params.min_p,
                repeat_penalty=1.0,
                reset=True,
            ):
                if token in self.eos_ids:
                    break
                tokens.append(int(token))
                if len(tokens) >= max_new_tokens:
                    break
        seconds = time.perf_counter() - start
        return MethodOutput(token_ids=tokens, seconds=seconds)


def import_llama() -> Any:
    """llama_cpp.Llama, imported on first use (an optional extra)."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise InvalidRequestError(
            f"method 'llamacpp' needs the optional llama-cpp-python package ({error}); install it with "
            f"{LLAMACPP_INSTALL_HINT}"
        ) from None
    return Llama


def split_methods(spec: str | Iterable[str]) -> list[str]:
    """Method names from ``"a,b,c"``; the baseline ``ar`` is put first (added if missing); no duplicates."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise InvalidRequestError("--methods is empty; name at least one method, e.g. ar,hf,ngram")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequestError(f"--methods names {', '.join(duplicates)} more than once")
    if "none" in names:
        raise InvalidRequestError("use 'ar' (not 'none') for quickdraft's plain decoding in --methods")
    return [BASELINE] + [n for n in names if n != BASELINE]


def parse_method(name: str) -> tuple[str, int | None]:
    """A method name's drafter and fixed draft budget: ``"suffix@8"`` is the suffix drafter verifying 8 draft
    nodes every step, ``"suffix"`` the same drafter with the budget chosen per step (None); ``"vllm+suffix@8"``
    is the suffix drafter inside vLLM with 8 speculative tokens."""
    from quickdraft.bench.vllm_peer import QUICKDRAFT, parse_vllm_method

    if name.startswith(QUICKDRAFT):
        method = parse_vllm_method(name)
        return str(method.drafter), method.k
    drafter, at, budget = name.partition("@")
    if not at:
        return name, None
    if drafter == BASELINE or drafter in PEERS:
        raise InvalidRequestError(f"method {name!r}: only a drafter method takes @N (a fixed draft budget)")
    if not budget.isdigit() or int(budget) < 1:
        raise InvalidRequestError(f"method {name!r}: after @ comes the fixed draft budget, an integer >= 1, "
                                  f"e.g. {drafter}@8")
    return drafter, int(budget)


def check_methods(methods: Sequence[str], *, draft_model: str | None = None,
                  params: SamplingParams | None = None) -> None:
    """Fail early (before any model loads) on a method that cannot run."""
    from quickdraft.bench.vllm_peer import check_vllm_method, is_vllm_method
    from quickdraft.drafters import available_drafters, drafter_class
    from quickdraft.errors import UnknownDrafterError

    for method in methods:
        if is_vllm_method(method):
            check_vllm_method(method, params)
            continue
        name, _ = parse_method(method)
        if name == BASELINE or name in PEERS:
            continue
        try:
            drafter_class(name)
        except UnknownDrafterError:
            raise InvalidRequestError(
                f"unknown method {name!r}; choose from ar, {', '.join(PEERS)}, or a drafter: "
                f"{', '.join(available_drafters())}"
            ) from None
    if "hf-assisted" in methods and not draft_model:
        raise InvalidRequestError("method 'hf-assisted' needs a draft model: pass --draft-model PATH")
    if "llamacpp" in methods:
        import_llama()


def build_runners(
    engine: Any,
    methods: list[str],
    *,
    draft_model: str | None = None,
    drafter_options: dict[str, dict[str, Any]] | None = None,
    seed: int | None = None,
    llamacpp_threads: int | None = None,
) -> list[MethodRunner]:
    """A runner per method name; drafter names (with an optional ``@N`` fixed budget, :func:`parse_method`) go
    to ``engine.with_drafter`` (which rejects unknown ones).

    ``drafter_options`` maps a method name to its drafter options.
    """
    from quickdraft.bench.vllm_peer import build_vllm_runner, is_vllm_method

    drafter_options = drafter_options or {}
    runners: list[MethodRunner] = []
    draft: LoadedModel | None = None
    eos = engine_eos_ids(engine)
    for name in methods:
        if name == BASELINE:
            runners.append(EngineRunner(name, *recording_engine(engine)))
        elif name == "hf":
            runners.append(HFRunner(name, engine.hf_model, engine.tokenizer, eos_ids=eos))
        elif name == "hf-pld":
            runners.append(
                HFRunner(
                    name, engine.hf_model, engine.tokenizer, prompt_lookup_num_tokens=PLD_NUM_TOKENS, eos_ids=eos
                )
            )
        elif name == "hf-assisted":
            if not draft_model:
                raise InvalidRequestError("method 'hf-assisted' needs a draft model: pass --draft-model PATH")
            if draft is None:
                draft = load_draft_model(draft_model, engine.dtype, engine.device)
            draft_tokenizer, draft_hf = draft.tokenizer, draft.hf_model
            target_vocab = engine.hf_model.config.get_text_config().vocab_size
            same_vocab = draft_hf.config.get_text_config().vocab_size == target_vocab
            runners.append(
                HFRunner(
                    name,
                    engine.hf_model,
                    engine.tokenizer,
                    assistant_model=draft_hf,
                    assistant_tokenizer=None if same_vocab else draft_tokenizer,
                    eos_ids=eos,
                )
            )
        elif name == "llamacpp":
            device = torch.device(engine.device)
            runners.append(
                LlamaCppRunner(
                    str(engine.model_path),
                    eos_ids=eos,
                    n_threads=llamacpp_threads,
                    n_gpu_layers=-1 if device.type == "cuda" else 0,
                    seed=seed,
                )
            )
        elif is_vllm_method(name):
            runners.append(build_vllm_runner(name, str(engine.model_path), dtype_name(engine.dtype), eos,
                                             drafter_options.get(name), seed))
        else:
            drafter, budget = parse_method(name)
            runners.append(EngineRunner(name, engine.with_drafter(drafter, drafter_options.get(name) or None, budget)))
    return runners
