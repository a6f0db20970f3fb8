"""``run_bench``: build the method runners, run the interleaved loop, aggregate and compare."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from quickdraft.bench.dataset import Question
from quickdraft.bench.divergence import compare_to_baseline
from quickdraft.bench.harness import Conversation, EngineConversation, run_loop
from quickdraft.bench.metrics import aggregate
from quickdraft.bench.report import BenchReport, hardware_info, source_revision
from quickdraft.bench.runners import MethodRunner, build_runners, split_methods
from quickdraft.devices import dtype_name
from quickdraft.errors import InvalidRequestError
from quickdraft.models.quantized import resident_bytes
from quickdraft.types import SamplingParams


def engine_settings(engine: Any) -> dict[str, Any]:
    """The report's description of the engine: model path, dtype, weights mode, device, hardware, and
    ``resident_bytes``: this process's resident memory (VmRSS) when called, i.e. the loaded model with the
    Python, PyTorch and transformers it runs on (called right after loading, before anything else is built)."""
    return {
        "model": str(engine.model_path),
        "dtype": dtype_name(engine.dtype),
        "weights": weights_mode(engine),
        "resident_bytes": resident_bytes(),
        "device": str(engine.device),
        "hardware": hardware_info(engine.device),
        "quickdraft": source_revision(),
    }


def weights_mode(engine: Any) -> str | None:
    """The weights mode ``engine``'s model holds (``dense``, ``int8`` or ``int4``; ``auto`` resolved;
    :mod:`quickdraft.models.quantized`); None for a model built in memory, whose mode is not recorded."""
    return getattr(engine.loaded, "weights", None)


def run_bench(
    engine: Any,
    questions: Sequence[Question],
    methods: str | Sequence[str] = "ar",
    *,
    max_new_tokens: int = 128,
    params: SamplingParams | None = None,
    draft_model: str | None = None,
    drafter_options: dict[str, dict[str, Any]] | None = None,
    warmup_tokens: int | None = None,
    llamacpp_threads: int | None = None,
    on_generation: Callable[[str, str], None] | None = None,
    settings: dict[str, Any] | None = None,
    runners: Sequence[MethodRunner] | None = None,
    conversation: Conversation | None = None,
) -> BenchReport:
    """Benchmark ``methods`` on ``questions`` with one loaded ``engine`` and return the report.

    ``methods``: ``"ar,hf,ngram"`` or a list; ``ar`` is always run, as the baseline. Tests (or other callers)
    may pass ready ``runners`` and a ``conversation`` instead of an engine.
    ``drafter_options`` maps a drafter method's name to its options.
    """
    if not questions:
        raise InvalidRequestError("no questions to benchmark")
    params = params or SamplingParams()
    # Read before the methods are built (their drafters and peers add memory) and before measuring (the code
    # that runs is the code loaded at the start).
    full_settings: dict[str, Any] = engine_settings(engine) if engine is not None else {}
    if runners is None:
        if engine is None:
            raise InvalidRequestError("run_bench needs an engine or ready runners")
        names = split_methods(methods)
        runners = build_runners(
            engine,
            names,
            draft_model=draft_model,
            drafter_options=drafter_options,
            seed=params.seed,
            llamacpp_threads=llamacpp_threads,
        )
    if conversation is None:
        if engine is None:
            raise InvalidRequestError("run_bench needs an engine or a conversation")
        conversation = EngineConversation(engine)
    run = run_loop(
        questions,
        runners,
        conversation,
        max_new_tokens=max_new_tokens,
        params=params,
        warmup_tokens=warmup_tokens,
        on_generation=on_generation,
    )
    full_settings.update(
        max_new_tokens=max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        seed=params.seed,
        questions=len(questions),
        baseline=run.baseline,
    )
    full_settings.update(settings or {})
    return BenchReport(run, aggregate(run), compare_to_baseline(run), full_settings)
