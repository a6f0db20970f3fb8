"""``quickdraft bench`` and ``quickdraft profile``: compare decoding methods fairly on one loaded model.

- :mod:`~quickdraft.bench.dataset`: Spec-Bench reader, task groups, the built-in prompt set;
- :mod:`~quickdraft.bench.runners`: one timed runner per method (ar, drafters, hf, hf-pld, hf-assisted, llamacpp);
- :mod:`~quickdraft.bench.harness`: warm-up and the interleaved loop (a seeded method order per question,
  multi-turn handling);
- :mod:`~quickdraft.bench.metrics`: tokens/s, speedup, tau, per task group;
- :mod:`~quickdraft.bench.top2`: the top-2 logits ar decoded with, recorded as it decodes;
- :mod:`~quickdraft.bench.divergence`: token-for-token comparison with ar, top-2 logit gaps;
- :mod:`~quickdraft.bench.report`: JSON, rich table, speedup plot;
- :mod:`~quickdraft.bench.run`: :func:`run_bench`, the programmatic entry;
- :mod:`~quickdraft.bench.profile`: the verification cost curve c(k) and efficiency against the bound;
- :mod:`~quickdraft.bench.cli`: argument parsers and mains for the two subcommands.

Names are imported on first use, so ``import quickdraft.bench`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_bench_arguments": "quickdraft.bench.cli",
    "add_profile_arguments": "quickdraft.bench.cli",
    "bench_main": "quickdraft.bench.cli",
    "profile_main": "quickdraft.bench.cli",
    "Question": "quickdraft.bench.dataset",
    "builtin_questions": "quickdraft.bench.dataset",
    "load_questions": "quickdraft.bench.dataset",
    "read_questions": "quickdraft.bench.dataset",
    "BenchRun": "quickdraft.bench.harness",
    "Record": "quickdraft.bench.harness",
    "run_loop": "quickdraft.bench.harness",
    "BenchReport": "quickdraft.bench.report",
    "run_bench": "quickdraft.bench.run",
    "MethodOutput": "quickdraft.bench.runners",
    "MethodRunner": "quickdraft.bench.runners",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quickdraft.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
