"""The one decoding step: propose -> verify -> commit -> observe, for one sequence or a batch.

Every path that generates goes through :func:`prefill` once per request and then :func:`step` until the
request is done: :class:`~quickdraft.engine.Engine` (a batch of one with its own KV cache),
:class:`~quickdraft.batching.BatchScheduler` (a batch of rows of one shared KV cache, verified in ONE target
forward) and the scheduler's transformers fallback (one sequence per forward). Plain decoding is the same
step with no drafter: every draft tree is empty, so each target forward commits exactly the bonus token.

Terms (see also :mod:`quickdraft.types`):

- **sequence**: one request being decoded (:class:`Sequence`): its committed tokens, generator, output,
  stats, drafter, target session and budget estimate.
- **room**: draft tokens that can still be useful to a sequence: the tokens it may still generate after the
  next bonus token. A budget is never larger than the room.
- **budget**: the number of draft nodes a sequence is given for one step, chosen by a
  :class:`~quickdraft.draft_budget.DraftBudget` (``choose(sequences) -> budgets``).

A drafter that raises in ``propose``, ``observe`` or ``evidence`` is ended and dropped from its sequence
(never given back to be reused: its state may be broken); the sequence goes on, losslessly, without drafts.
A drafter that raises in ``begin`` fails :func:`prefill` (the request has not started).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from quickdraft.detok import TextAssembler
from quickdraft.draft_budget import RequestEstimate
from quickdraft.drafters import DraftContext, Drafter, StepOutcome
from quickdraft.models.base import HIDDEN_STATES, TREE, ForwardOutput, TargetSession
from quickdraft.models.native_session import NativeSession, verify_batch
from quickdraft.sampling import choose, make_generator
from quickdraft.types import DraftTree, GenerationResult, GenerationStats, SamplingParams
from quickdraft.verify import verify_sampling

log = logging.getLogger(__name__)


@dataclass
class StreamChunk:
    """Text released by one step of :meth:`Engine.stream` and the tokens committed in it."""

    text: str
    token_ids: list[int]


class OutputTracker:
    """What a request keeps of its committed tokens: cut at EOS, at ``max_new_tokens`` and at stop strings,
    released as text when it can no longer change."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], max_new_tokens: int,
                 stop: list[str] | None = None) -> None:
        self.assembler = TextAssembler(tokenizer, stop)
        self.eos_token_ids = eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.generated: list[int] = []
        self.finish_reason = "length"

    def commit(self, tokens: list[int]) -> tuple[StreamChunk, int]:
        """Apply EOS and the token limit to a step's committed tokens; return the released chunk and how
        many of ``tokens`` count as generated (up to and including an EOS token)."""
        kept: list[int] = []
        committed = 0
        for token in tokens:
            committed += 1
            if token in self.eos_token_ids:
                self.finish_reason = "stop"
                break
            kept.append(token)
            if len(self.generated) + len(kept) >= self.max_new_tokens:
                break
        self.generated.extend(kept)
        text = self.assembler.add(kept)
        if self.assembler.stopped:
            self.finish_reason = "stop"
        return StreamChunk(text, kept), committed

    @property
    def done(self) -> bool:
        return (self.finish_reason == "stop" or self.assembler.stopped
                or len(self.generated) >= self.max_new_tokens)

    def finish(self) -> str:
        """Release the text still held back (generation has ended)."""
        return self.assembler.finish()

    @property
    def text(self) -> str:
        return self.assembler.text


def cache_slots(tokens: int, max_budget: int) -> int:
    """KV cache slots a sequence of up to ``tokens`` tokens (prompt + completion) needs when each step
    verifies up to ``max_budget`` draft nodes: the root and the nodes of the last step may lie beyond it."""
    return tokens + max_budget + 1


class Sequence:
    """One request being decoded: the per-request state that :func:`prefill` and :func:`step` read and write.

    ``ctx.tokens`` are the prompt and the committed tokens (the last one is the root of the next tree);
    ``output`` cuts them into the reply; ``stats`` counts them; ``estimate`` is what the budget policies
    learned about this request's drafter. ``session`` and ``drafter`` are attached by the caller
    (:meth:`attach`) before :func:`prefill`."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, output: OutputTracker,
                 drafter_name: str = "none") -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output = output
        self.generator = make_generator(params.seed, "cpu")
        self.ctx = DraftContext(list(prompt_ids), len(prompt_ids), params, self.generator)
        self.stats = GenerationStats(drafter=drafter_name)
        self.estimate = RequestEstimate()
        self.session: TargetSession | None = None
        self.drafter: Drafter | None = None
        self.started = time.perf_counter()

    @property
    def max_new_tokens(self) -> int:
        return self.output.max_new_tokens

    @property
    def room(self) -> int:
        """Draft nodes that can still be useful: tokens still wanted after the next bonus token."""
        return self.max_new_tokens - len(self.output.generated) - 1

    @property
    def done(self) -> bool:
        return self.output.done

    def attach(self, session: TargetSession, drafter: Drafter | None) -> None:
        """Give the sequence its target session and drafter (None: plain decoding)."""
        self.session = session
        self.drafter = drafter
        self.ctx.target = session if drafter is not None and "target_session" in drafter.needs else None

    def commit(self, tokens: list[int]) -> tuple[StreamChunk, int]:
        """Apply EOS, the token limit and stop strings to committed ``tokens``; the released chunk and how
        many tokens count as committed (see :class:`OutputTracker`)."""
        chunk, committed = self.output.commit(tokens)
        self.stats.new_tokens += committed
        return chunk, committed

    def read_evidence(self) -> int:
        """The drafter's evidence for the coming step (0 without a drafter), kept in ``estimate.evidence`` for
        the step's observation."""
        self.estimate.evidence = 0
        with self.drafting("evidence"):
            self.estimate.evidence = self.drafter.evidence(self.ctx) if self.drafter else 0
        return self.estimate.evidence

    def release_drafter(self) -> Drafter | None:
        """End the drafter (the request is over); return it for reuse, or None if there is none or it failed
        to end."""
        drafter, self.drafter = self.drafter, None
        if drafter is None:
            return None
        try:
            drafter.end()
        except Exception:  # noqa: BLE001 - a drafter that cannot end is not reused
            log.exception("drafter end failed; discarding it")
            return None
        return drafter

    @contextmanager
    def drafting(self, what: str) -> Iterator[None]:
        """Time a drafter call (``what``: its name, for the log) into ``stats.draft_seconds``; a drafter that
        raises is ended and forgotten (:meth:`release_drafter`, its return value dropped: it is not reused), and
        the sequence decodes on without drafts."""
        started = time.perf_counter()
        try:
            yield
        except Exception:  # noqa: BLE001 - a drafter bug must not break lossless decoding
            log.exception("drafter %s failed; it drafts no more for this request", what)
            self.release_drafter()
        finally:
            self.stats.draft_seconds += time.perf_counter() - started

    def result(self) -> GenerationResult:
        return GenerationResult(self.output.text, list(self.output.generated), list(self.prompt_ids),
                                self.output.finish_reason, self.stats)


def prefill(sequence: Sequence) -> StreamChunk:
    """Start the request: ``drafter.begin``, one forward over the prompt, the first token sampled and
    committed; a drafter that needs ``"hidden_states"`` then observes the prompt's (``observe_prompt``). Raises
    whatever the drafter's ``begin`` or the forward raises."""
    sequence.started = time.perf_counter()
    drafter = sequence.drafter
    if drafter is not None:
        drafter.begin(sequence.ctx)
    hidden = None
    if drafter is not None and "hidden_states" in drafter.needs and HIDDEN_STATES in sequence.session.capabilities:
        out = sequence.session.prefill_hidden(sequence.ctx.tokens, drafter.hidden_layers)
        logits, hidden = out.logits[-1], out.hidden
    else:
        logits = sequence.session.prefill(sequence.ctx.tokens)
    first = choose(logits, sequence.params, sequence.generator)
    sequence.stats.prefill_seconds = time.perf_counter() - sequence.started
    sequence.stats.target_forwards = 1
    sequence.ctx.tokens.append(first)
    if hidden is not None:
        with sequence.drafting("observe_prompt"):
            drafter.observe_prompt(sequence.ctx, hidden)
    return sequence.commit([first])[0]


@dataclass
class StepReport:
    """What one :func:`step` did: the chunk each sequence released (in order), and totals over the batch."""

    chunks: list[StreamChunk]
    committed: int  # committed tokens, EOS included
    drafted: int
    accepted: int
    rows: int  # rows of the verification: sequences x (1 + the largest tree)
    seconds: float  # time in the target forward(s)


def step(sequences: list[Sequence], budgets: list[int]) -> StepReport:
    """One decoding step for every sequence: propose a tree of at most ``budgets[i]`` nodes (and the room),
    verify all trees (one target forward when the sessions share a cache, see :func:`verify_all`), then
    commit each sequence's accepted path and bonus token and let its drafter and estimate observe."""
    budgets = [min(b, s.room) if s.drafter is not None else 0 for s, b in zip(sequences, budgets)]
    trees = [propose(s, b) for s, b in zip(sequences, budgets)]
    started = time.perf_counter()
    outputs = verify_all(sequences, trees)
    seconds = time.perf_counter() - started
    settled = [settle(s, t, b, out) for s, t, b, out in zip(sequences, trees, budgets, outputs)]
    return StepReport([chunk for chunk, _, _ in settled], sum(n for _, n, _ in settled),
                      sum(t.size for t in trees), sum(a for _, _, a in settled),
                      len(sequences) * (1 + max((t.size for t in trees), default=0)), seconds)


def propose(sequence: Sequence, budget: int) -> DraftTree:
    """The drafter's tree of at most ``budget`` nodes (a chain where the session verifies chains only)."""
    if budget <= 0 or sequence.drafter is None:
        return DraftTree.empty()
    tree = DraftTree.empty()
    with sequence.drafting("propose"):
        tree = sequence.drafter.propose(sequence.ctx, budget).truncated(budget)
    if TREE not in sequence.session.capabilities and not tree.is_chain():
        tree = tree.first_chain()
    return tree


def verify_all(sequences: list[Sequence], trees: list[DraftTree]) -> list[ForwardOutput]:
    """Each sequence's verification output (logits ``[1 + tree.size, V]`` in node order, hidden states the
    drafters need). Sessions that are views on consecutive rows of one shared cache are verified in ONE
    forward (:func:`~quickdraft.models.native_session.verify_batch`); others one forward each."""
    layers = tuple(sorted({layer for s in sequences if s.drafter is not None and "hidden_states" in s.drafter.needs
                           for layer in s.drafter.hidden_layers}))
    roots = [s.ctx.tokens[-1] for s in sequences]
    sessions = [s.session for s in sequences]
    if all(isinstance(session, NativeSession) and session.shares_cache for session in sessions):
        return verify_batch(sessions, roots, trees, layers)
    return [session.verify(root, tree, layers) for session, root, tree in zip(sessions, roots, trees)]


def settle(sequence: Sequence, tree: DraftTree, budget: int, out: ForwardOutput) -> tuple[StreamChunk, int, int]:
    """Verify losslessly with the request's own sampling parameters and generator, keep the accepted path in
    the cache, let the estimate and the drafter observe, and commit. Returns the released chunk, the committed
    tokens counted (see :meth:`Sequence.commit`) and the accepted draft tokens."""
    result = verify_sampling(tree, out.logits, sequence.params, sequence.generator)
    sequence.session.commit(result.accepted_nodes)
    sequence.estimate.observe(tree, result, budget)
    sequence.stats.target_forwards += 1
    sequence.stats.drafted_tokens += tree.size
    sequence.stats.accepted_tokens += result.num_accepted
    sequence.ctx.tokens.extend(result.tokens)
    if sequence.drafter is not None:
        logits = out.logits if "target_logits" in sequence.drafter.needs else None
        with sequence.drafting("observe"):
            sequence.drafter.observe(sequence.ctx, StepOutcome(tree, result, logits, out.hidden))
    chunk, committed = sequence.commit(result.tokens)
    return chunk, committed, result.num_accepted
