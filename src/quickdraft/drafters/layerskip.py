"""Self-speculation by layer skipping: the target drafts for itself with some of its layers skipped.

References: SWIFT (Xia et al. 2024, "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference
Acceleration") and Draft & Verify (Zhang et al. 2023, "Draft & Verify: Lossless Large Language Model
Acceleration via Self-Speculative Decoding").

Terms (draft, accepted and bonus tokens, target forward, tau: see :mod:`quickdraft.types`):

- **skip set**: the decoder layers the draft forward leaves out. The draft is the target's own forward
  without them (:meth:`~quickdraft.models.base.TargetSession.draft_forward`); the layers it runs read the
  target's KV cache of the committed tokens, and its own keys/values are written beyond the committed
  length, where the verification forward overwrites them. No extra weights, no extra cache.
- **draft cost ratio** ``r = (L - |skip set|) / L`` for an ``L``-layer target: the cost of one draft forward
  relative to one target forward (embedding and LM head are ignored).
- **efficiency** of a step that ran ``f`` draft forwards and accepted ``a`` draft tokens:
  ``(1 + a) / (1 + f * r)``, committed tokens per target-forward-equivalent of work. Over several steps
  it is the ratio of the sums. It is the speed-up the step would give if a verification cost one forward.
- **confidence**: the draft's top-1 probability (softmax of its raw logits, whatever the request's
  sampling parameters). Drafting stops before a token whose confidence is below ``threshold``, so the draft
  length adapts per step (SWIFT's and Draft & Verify's early stopping); the first token is always drafted.

Skip-set search (on the fly, from accepted-length feedback, in the spirit of SWIFT's per-task
optimisation, which needs no training and no calibration data):

1. Start from the default: every other layer of the middle (layers ``1 .. L-2``; ``{1}`` for 3 layers).
2. Run the current set and keep an exponential moving average of its step efficiency.
3. Every ``interval`` steps, try a **candidate**: the current set with one random move, drawn from a
   private seeded generator so that the request's sampling stream is untouched. Local moves refine (swap a
   skipped layer for a kept one, skip one more layer, keep one more); coarse moves rescale (keep a random
   half of the skipped layers, or skip half as many again), so that a default far too aggressive for a
   small model (or too timid for a large one) is corrected in a few trials. The candidate runs for
   ``trial_steps`` steps.
4. If the candidate's efficiency over its trial beats the current set's average, it becomes the current
   set (its trial efficiency seeds the average); otherwise the current set resumes.

The current skip set and its average are the only state kept across requests (bounded: one set of at most
``L`` layers and one number), so later requests of the same task start from what was learnt; everything
per request (the trial in progress, the step's forward count) is reset in :meth:`end`.

Sampling stays exact: each draft token is drawn from ``probabilities(draft logits, params)`` and that
distribution is recorded as the node's ``draft_probs`` for rejection sampling; greedy requests take the
argmax and record nothing (point masses).

Needs a target session that declares ``LAYER_SKIP`` (the native forward); the transformers fallback
cannot skip layers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from quickdraft.drafters import register
from quickdraft.drafters.base import DraftContext, Drafter, DrafterSetup, StepOutcome
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import LAYER_SKIP, TargetSession
from quickdraft.sampling import probabilities, sample
from quickdraft.types import DraftTree

NATIVE_ONLY = (
    "the layerskip drafter needs the native forward (a target session with the 'layer_skip' capability), "
    "which serves the Llama family (llama, mistral, qwen2, qwen3); this target runs through the transformers "
    "fallback, so choose another drafter for it"
)


def default_skip_set(num_layers: int) -> frozenset[int]:
    """Every other layer of the middle: ``{1, 3, 5, ...}`` within ``1 .. L-2`` (``{0}`` for 2 layers)."""
    allowed = skippable_layers(num_layers)
    return frozenset(allowed[::2])


def skippable_layers(num_layers: int) -> list[int]:
    """Layers the search may skip: all but the first and the last (for 2 layers, the first)."""
    if num_layers >= 3:
        return list(range(1, num_layers - 1))
    return list(range(num_layers - 1))


def perturb(skip: frozenset[int], allowed: list[int], rng: random.Random) -> frozenset[int]:
    """One random move from ``skip`` (see the module docstring); never empty, equal to ``skip`` only when
    no move exists."""
    kept = [layer for layer in allowed if layer not in skip]
    skipped = sorted(skip)
    moves = []
    if skipped and kept:
        moves.append(lambda: (skip - {rng.choice(skipped)}) | {rng.choice(kept)})  # swap one
    if kept:
        moves.append(lambda: skip | {rng.choice(kept)})  # skip one more
        moves.append(lambda: skip | set(rng.sample(kept, min(len(kept), max(1, len(skipped) // 2)))))  # grow by half
    if len(skipped) > 1:
        moves.append(lambda: skip - {rng.choice(skipped)})  # keep one more
        moves.append(lambda: frozenset(rng.sample(skipped, len(skipped) // 2)))  # halve
    if not moves:
        return skip
    return frozenset(rng.choice(moves)())


def cost_ratio(skip: frozenset[int], num_layers: int) -> float:
    """Cost of one draft forward relative to one target forward."""
    return (num_layers - len(skip)) / num_layers


@dataclass
class _Trial:
    """A candidate skip set being tried, and what it achieved so far."""

    skip: frozenset[int]
    steps: int = 0
    committed: float = 0.0
    cost: float = 0.0

    @property
    def efficiency(self) -> float:
        return self.committed / self.cost if self.cost else 0.0


@register("layerskip")
class LayerSkipDrafter(Drafter):
    """Options: ``skip`` (initial skip set, comma-separated layer indices; default: every other middle
    layer), ``threshold`` (confidence below which drafting stops, default 0.6), ``max_draft`` (draft tokens
    per step at most, default 10), ``search`` (tune the skip set on the fly, default True), ``interval``
    (steps between candidate trials, default 6), ``trial_steps`` (steps per trial, default 3),
    ``smoothing`` (weight of the newest step in the efficiency average, default 0.1), ``seed`` (search
    randomness, default 0)."""

    needs = frozenset({"target_session"})
    option_names = frozenset({"skip", "threshold", "max_draft", "search", "interval", "trial_steps", "smoothing",
                              "seed"})

    def __init__(
        self,
        num_layers: int,
        skip: frozenset[int] | None = None,
        threshold: float = 0.6,
        max_draft: int = 10,
        search: bool = True,
        interval: int = 6,
        trial_steps: int = 3,
        smoothing: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.num_layers = num_layers
        self.allowed = skippable_layers(num_layers)
        self.skip = frozenset(skip) if skip is not None else default_skip_set(num_layers)
        _check_skip(self.skip, num_layers)
        self.threshold = float(threshold)
        self.max_draft = int(max_draft)
        self.search = _as_bool(search)
        self.interval = int(interval)
        self.trial_steps = int(trial_steps)
        self.smoothing = float(smoothing)
        self.rng = random.Random(seed)
        self.score: float | None = None  # efficiency average of self.skip (kept across requests)
        self._trial: _Trial | None = None
        self._since_trial = 0
        self._forwards = 0
        self._active = self.skip

    @classmethod
    def from_setup(cls, setup: DrafterSetup) -> LayerSkipDrafter:
        probe = setup.target.new_session(1)
        try:
            _require_layer_skip(probe)
        finally:
            probe.close()
        options = dict(setup.options)
        if "skip" in options:
            options["skip"] = _parse_layers(options["skip"])
        for name, kind in (("threshold", float), ("max_draft", int), ("interval", int), ("trial_steps", int),
                           ("smoothing", float), ("seed", int)):
            if name in options:
                options[name] = kind(options[name])
        return cls(setup.target.num_layers, **options)

    def begin(self, ctx: DraftContext) -> None:
        if ctx.target is None:
            raise InvalidRequestError(NATIVE_ONLY)
        _require_layer_skip(ctx.target)
        self._trial = None
        self._since_trial = 0
        self._forwards = 0
        self._active = self.skip

    def propose(self, ctx: DraftContext, budget: int) -> DraftTree:
        """Draft a chain with the active skip set until ``budget``, ``max_draft`` or low confidence."""
        self._active = self._choose_skip_set()
        session: TargetSession = ctx.target
        limit = min(budget, self.max_draft)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        feed = ctx.tokens[-1]
        self._forwards = 0
        while len(tokens) < limit:
            logits = session.draft_forward([feed], self._active, offset=len(tokens)).logits[-1]
            self._forwards += 1
            if tokens and torch.softmax(logits.float(), -1).max() < self.threshold:
                break
            probs = probabilities(logits, ctx.params)
            feed = int(probs.argmax()) if ctx.params.greedy else sample(probs, ctx.generator)
            tokens.append(feed)
            rows.append(probs)
        draft_probs = None if ctx.params.greedy or not rows else torch.stack(rows)
        return DraftTree.chain(tokens, draft_probs)

    def observe(self, ctx: DraftContext, outcome: StepOutcome) -> None:
        """Score the step for the skip set that drafted it, and end a finished trial."""
        if not self.search or outcome.tree.size == 0:
            return
        committed = 1.0 + outcome.result.num_accepted
        cost = 1.0 + self._forwards * cost_ratio(self._active, self.num_layers)
        if self._trial is not None and self._active == self._trial.skip:
            self._record_trial(committed, cost)
            return
        efficiency = committed / cost
        self.score = efficiency if self.score is None else self.score + self.smoothing * (efficiency - self.score)
        self._since_trial += 1

    def end(self) -> None:
        self._trial = None
        self._since_trial = 0
        self._forwards = 0
        self._active = self.skip

    def _choose_skip_set(self) -> frozenset[int]:
        """The current set, or a fresh candidate when a trial is due."""
        if self._trial is not None:
            return self._trial.skip
        if self.search and self.score is not None and self._since_trial >= self.interval:
            candidate = perturb(self.skip, self.allowed, self.rng)
            self._since_trial = 0
            if candidate != self.skip:
                self._trial = _Trial(candidate)
                return candidate
        return self.skip

    def _record_trial(self, committed: float, cost: float) -> None:
        trial = self._trial
        trial.steps += 1
        trial.committed += committed
        trial.cost += cost
        if trial.steps < self.trial_steps:
            return
        if trial.efficiency > (self.score or 0.0):
            self.skip, self.score = trial.skip, trial.efficiency
        self._trial = None


def _require_layer_skip(session: TargetSession) -> None:
    if LAYER_SKIP not in session.capabilities:
        raise InvalidRequestError(NATIVE_ONLY)


def _check_skip(skip: frozenset[int], num_layers: int) -> None:
    bad = sorted(layer for layer in skip if not 0 <= layer < num_layers)
    if bad:
        raise InvalidRequestError(f"layerskip: layers {bad} do not exist; the target has layers 0..{num_layers - 1}")
    if len(skip) >= num_layers:
        raise InvalidRequestError("layerskip: the skip set must leave at least one layer to run")


def _parse_layers(value: object) -> frozenset[int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        return frozenset(int(p) for p in parts)
    except ValueError as error:
        raise InvalidRequestError(f"layerskip: skip must be comma-separated layer indices, got {value!r}") from error


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off")
    return bool(value)
