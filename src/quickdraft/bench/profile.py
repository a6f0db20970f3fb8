"""``quickdraft profile``: the target's verification cost curve, and bench efficiency against its bound.

**Cost curve.** c(k) = (time of one target forward over k new tokens) / (time of one forward over 1 token),
both on a KV cache already holding a context of about 300 tokens, on this hardware and dtype. Each k is
timed ``repeats`` times (the ks interleaved within every repeat, so drift hits all alike, after a warm-up
round) and the median is kept. The forward is the engine's own verification forward (``session.verify``
of its target, with a chain of k - 1 draft tokens after the root) when the engine exposes its target,
otherwise a transformers forward with a ``DynamicCache``; the cache is cut back to the context after each.

**Efficiency.** Per step, a speculative method commits tau tokens (on average) for one verification
forward over k rows (k = ``nodes_per_step``) plus its drafting, while ``ar`` commits one token per
1-row forward. If drafting costs d (in units of a 1-token forward), the best speedup the method can have is

    bound = tau / (c(k) + d),

and efficiency = measured speedup / bound (1.0: no overhead beyond drafting and verifying). From a bench
JSON, d is derived from ``draft_seconds_fraction`` f (time drafting / total time): per step drafting takes
f / (1 - f) of the verification time, so d = c(k) * f / (1 - f) and the bound is tau * (1 - f) / c(k).

Assumptions where the bench JSON lacks a value (each reported in the row's "assumed" list):

- ``draft_seconds_fraction`` missing: d = 0 (free drafting), so the bound is optimistic and the
  efficiency a lower bound;
- ``nodes_per_step`` missing: k = tau (a draft with no rejected rows: the fewest rows that could commit
  tau tokens), again the optimistic end;
- ``mean_accepted`` (tau) missing, as for peers: no bound; the row says so.

c(k) at a non-measured k is interpolated linearly between measured ks, and extrapolated linearly from the
last two beyond the largest (never downward; clamped to at least c(1) = 1 below it), as
:class:`~quickdraft.budget.CostCurve` does.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quickdraft.budget import CostCurve
from quickdraft.devices import synchronize
from quickdraft.errors import InvalidRequestError
from quickdraft.types import DraftTree

DEFAULT_KS = tuple(range(1, 65))
DEFAULT_CONTEXT = 300
DEFAULT_REPEATS = 7


@dataclass(frozen=True)
class CostPoint:
    """The median seconds of a forward over k new tokens, and c(k) relative to k = 1."""

    k: int
    seconds: float
    cost: float


def parse_ks(text: str | None) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4] (sorted, unique; 1 always included); None -> 1..64."""
    if text is None:
        return list(DEFAULT_KS)
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise InvalidRequestError(f"--ks must be comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise InvalidRequestError(f"--ks values must be >= 1, got {text!r}")
    return sorted(set(ks) | {1})


def context_ids(tokenizer: Any, length: int = DEFAULT_CONTEXT) -> list[int]:
    """``length`` token ids of ordinary prose (the built-in prompts, repeated as needed)."""
    from quickdraft.bench.prompts import BUILTIN_QUESTIONS

    text = "\n\n".join(t for row in BUILTIN_QUESTIONS for t in row["turns"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequestError("the tokenizer produced no tokens for the profiling context")
    while len(ids) < length + 64:
        ids = ids + ids
    return ids


def measure_cost_curve(
    time_forward: Callable[[int], float],
    ks: Sequence[int],
    repeats: int = DEFAULT_REPEATS,
    warmup_rounds: int = 1,
    on_measure: Callable[[int], None] | None = None,
) -> list[CostPoint]:
    """Median time of ``time_forward(k)`` for each k over ``repeats`` interleaved rounds, and c(k)."""
    if repeats < 1:
        raise InvalidRequestError(f"--repeats must be >= 1, got {repeats}")
    ks = sorted(set(ks) | {1})
    for _ in range(warmup_rounds):
        for k in ks:
            time_forward(k)
    samples: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(repeats):
        for k in ks:
            samples[k].append(time_forward(k))
            if on_measure:
                on_measure(k)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    base = medians[1]
    return [CostPoint(k, medians[k], medians[k] / base if base > 0 else float("nan")) for k in ks]


class TargetForwardTimer:
    """Times the engine's own verification forward: ``session.verify(root, chain of k - 1 tokens)``."""

    def __init__(self, target: Any, context: list[int], max_k: int, length: int = DEFAULT_CONTEXT) -> None:
        self.target = target
        self.length = length
        self.filler = context[length : length + max_k]
        self.session = target.new_session(length + max_k + 8)
        with torch.inference_mode():
            self.session.prefill(context[:length])
        self.device = torch.device(getattr(target, "device", "cpu"))
        self.name = f"engine target ({type(target).__name__}.verify)"

    def __call__(self, k: int) -> float:
        tree = DraftTree.chain(self.filler[1:k])
        with torch.inference_mode():
            synchronize(self.device)
            start = time.perf_counter()
            self.session.verify(self.filler[0], tree)
            synchronize(self.device)
            seconds = time.perf_counter() - start
        self.session.truncate(self.length)
        return seconds


class HFForwardTimer:
    """Times a transformers forward over k new tokens on a ``DynamicCache`` holding the context."""

    def __init__(self, hf_model: Any, context: list[int], max_k: int, length: int = DEFAULT_CONTEXT) -> None:
        self.model = hf_model
        self.length = length
        self.device = hf_model.device
        self.filler = torch.tensor([context[length : length + max_k]], device=self.device)
        ids = torch.tensor([context[:length]], device=self.device)
        with torch.inference_mode():
            self.cache = hf_model(input_ids=ids, use_cache=True).past_key_values
        self.name = f"transformers forward ({type(hf_model).__name__}, DynamicCache)"

    def __call__(self, k: int) -> float:
        positions = torch.arange(self.length, self.length + k, device=self.device)
        with torch.inference_mode():
            synchronize(self.device)
            start = time.perf_counter()
            self.model(
                input_ids=self.filler[:, :k],
                past_key_values=self.cache,
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                use_cache=True,
            )
            synchronize(self.device)
            seconds = time.perf_counter() - start
        # A negative argument removes that many tokens (transformers >= 5 rejects a positive target length).
        extra = self.cache.get_seq_length() - self.length
        if extra > 0:
            self.cache.crop(-extra)
        return seconds


def make_timer(engine: Any, ks: Sequence[int], backend: str = "auto", length: int = DEFAULT_CONTEXT):
    """The forward timer for ``backend`` ("auto": the engine's target if exposed, else transformers)."""
    from quickdraft.bench.runners import engine_target

    context = context_ids(engine.tokenizer, length)
    max_k = max(ks)
    target = engine_target(engine)
    if backend == "engine" and target is None:
        raise InvalidRequestError("this engine exposes no target model to profile; use --backend hf")
    if backend in ("auto", "engine") and target is not None:
        return TargetForwardTimer(target, context, max_k, length)
    if backend not in ("auto", "hf", "engine"):
        raise InvalidRequestError(f"--backend must be auto, engine or hf, got {backend!r}")
    return HFForwardTimer(engine.hf_model, context, max_k, length)


def interpolate_cost(curve: Sequence[CostPoint], k: float) -> float:
    """c(k) at any k >= 1: :class:`~quickdraft.budget.CostCurve`'s interpolation of the measured points,
    extrapolated past the largest."""
    points = sorted((p.k, p.cost) for p in curve)
    if not points:
        raise ValueError("empty cost curve")
    ks, costs = zip(*points)
    return CostCurve(ks, costs)(k, extrapolate=True)


def efficiency_row(name: str, entry: dict[str, Any], curve: Sequence[CostPoint]) -> dict[str, Any]:
    """One method of a bench JSON against the bound tau / (c(k) + d); see the module docstring."""
    tau = entry.get("mean_accepted")
    speedup = entry.get("speedup")
    row: dict[str, Any] = {"method": name, "tau": tau, "speedup": speedup, "assumed": []}
    if tau is None:
        row.update(k=None, cost=None, draft_cost=None, bound=None, efficiency=None)
        row["assumed"].append("tau unknown (peer): no bound")
        return row
    k = entry.get("nodes_per_step")
    if k is None:
        k = tau
        row["assumed"].append("nodes_per_step missing: k = tau")
    fraction = entry.get("draft_seconds_fraction")
    if fraction is None:
        fraction = 0.0
        row["assumed"].append("draft_seconds_fraction missing: drafting free")
    cost = interpolate_cost(curve, float(k))
    fraction = min(max(float(fraction), 0.0), 0.999)
    draft_cost = cost * fraction / (1.0 - fraction)
    bound = tau / (cost + draft_cost)
    row.update(
        k=k,
        cost=cost,
        draft_cost=draft_cost,
        bound=bound,
        efficiency=(speedup / bound) if speedup is not None and bound > 0 else None,
    )
    return row


def efficiency_table(bench: dict[str, Any], curve: Sequence[CostPoint]) -> list[dict[str, Any]]:
    methods = bench.get("methods")
    if not isinstance(methods, dict):
        raise InvalidRequestError(
            "the bench JSON has no 'methods' object; pass a file written by quickdraft bench --json"
        )
    return [efficiency_row(name, entry, curve) for name, entry in methods.items()]


def read_bench_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"bench JSON {str(path)!r} does not exist; write one with quickdraft bench --json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"bench JSON {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"bench JSON {str(path)!r} must hold an object")
    return data


def curve_to_json(curve: Sequence[CostPoint], settings: dict[str, Any]) -> dict[str, Any]:
    payload = dict(settings)
    payload["curve"] = [{"k": p.k, "seconds": p.seconds, "cost": p.cost} for p in curve]
    return payload
