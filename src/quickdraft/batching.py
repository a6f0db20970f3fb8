"""Continuous batching with speculative decoding: many requests, one target forward per step.

A :class:`BatchScheduler` owns a KV cache of ``max_batch`` rows and runs in one background thread. Callers
(the HTTP server) :meth:`~BatchScheduler.submit` requests from any thread and receive events through a sink
callback; the scheduler never blocks on a caller.

Each iteration of the scheduler loop

1. takes new commands from its inbox: a new request is tokenized and validated (an :class:`Admitted` or a
   :class:`Failed` event goes out at once) and joins the waiting queue; a cancellation drops its sequence;
2. admits waiting requests into free cache rows: each newcomer is prefilled on its own (one forward over its
   prompt into its row), its first token sampled and streamed, and it joins the batch (continuous batching);
3. runs one step for the whole batch: chooses one draft budget for every sequence with
   :class:`~quickdraft.batch_budget.BatchBudgetPolicy` (shrinking to 0 as the batch grows if the measured cost
   curve says speculation no longer pays; young sequences are still probed with 2 draft tokens every 8th
   step then, so acceptance keeps being learned), asks each sequence's own drafter for a tree, verifies all trees in
   ONE target forward (:func:`~quickdraft.models.native.verify_batch`, each row with its own cache length and
   tree mask), then per sequence: lossless :func:`~quickdraft.verify.verify_sampling` with that request's
   sampling parameters and generator, compaction of its cache row along its accepted path (ragged
   acceptance), ``drafter.observe``, EOS / token limit / stop strings via
   :class:`~quickdraft.engine.OutputTracker`, and a :class:`Delta` event with the released text.

Finished or cancelled sequences free their row at once: the last live row is moved into the hole, so live
rows are always ``0 .. B - 1``. Drafters are kept in a pool of at most ``max_batch`` instances (one per live
sequence; ``begin``/``end`` per request), so cross-request state a drafter keeps survives and nothing is
built per request.

Targets without tree verification (the transformers fallback) are served one request at a time through the
plain :class:`~quickdraft.engine.Engine` loop, with the same events.

Every submitted request ends with exactly one :class:`Finished` or :class:`Failed` event (none after a
cancel): a request that :meth:`~BatchScheduler.close` cuts off, running or waiting, fails with status 503
(``shutting_down``); it is never reported as finished. Once the scheduler is closing, :meth:`~BatchScheduler.submit`
raises :class:`SchedulerClosed`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from quickdraft.batch_budget import AcceptanceEstimate, BatchBudgetPolicy, measure_batch_curve
from quickdraft.budget import CostCurve
from quickdraft.drafters import DraftContext, Drafter, DrafterSetup, StepOutcome, create_drafter
from quickdraft.engine import Engine, OutputTracker, check_drafter, check_max_new_tokens
from quickdraft.errors import InvalidRequestError, QuickdraftError
from quickdraft.models.native import NativeCausalLM, NativeSession, verify_batch
from quickdraft.sampling import choose, make_generator
from quickdraft.types import DraftTree, GenerationResult, GenerationStats, SamplingParams
from quickdraft.verify import verify_sampling

if TYPE_CHECKING:
    from quickdraft.engine import _Run

log = logging.getLogger(__name__)

#: Default largest draft budget per sequence in a batch.
DEFAULT_MAX_DRAFT = 16
#: When the policy says "do not speculate", every PROBE_EVERY-th step still drafts PROBE_BUDGET tokens for
#: sequences that have tried fewer than PROBE_UNTIL draft tokens: cheap exploration.
PROBE_EVERY = 8
PROBE_BUDGET = 2
PROBE_UNTIL = 6
#: The error of a request that the scheduler's shutdown cut off.
SHUTDOWN_MESSAGE = "the server is shutting down and did not complete this request; send it again later"


@dataclass
class ServeRequest:
    """A request for the scheduler. ``prompt`` is raw text (tokenized as is: no chat template), chat messages
    (the model's chat template is applied) or token ids. ``max_new_tokens``: an integer >= 1, or None for up to
    the context. ``fit_to_context``: a ``max_new_tokens`` that does not fit after the prompt is clamped to the
    room left (as the engine does); False: the request fails with ``context_length_exceeded`` instead (as the
    OpenAI API does)."""

    prompt: str | list[dict[str, Any]] | list[int]
    max_new_tokens: int | None
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    sink: Callable[[Event], None] = lambda event: None
    fit_to_context: bool = True


@dataclass
class Admitted:
    """The request is valid and queued; ``max_new_tokens`` after clamping to the context."""

    prompt_tokens: int
    max_new_tokens: int


@dataclass
class Delta:
    """Newly released text and the tokens committed with it (text may lag tokens, see TextAssembler)."""

    text: str
    token_ids: list[int]


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    stats: GenerationStats


@dataclass
class Failed:
    """The request cannot be served; ``status`` is the HTTP status a server should answer with."""

    message: str
    status: int = 400
    code: str | None = None


Event = Union[Admitted, Delta, Finished, Failed]


class SchedulerBusy(QuickdraftError):
    """Too many requests are waiting; try again later."""


class SchedulerClosed(SchedulerBusy):
    """The scheduler is not running (not started, closing or closed, or stopped by an error)."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt and the completion asked for, do not fit in the context."""


@dataclass
class SchedulerStats:
    """Counters since start (written by the scheduler thread only)."""

    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    committed_tokens: int = 0  # including EOS tokens, as in GenerationStats.new_tokens
    sequence_forwards: int = 0  # forwards each sequence took part in (prefill included): tau's denominator
    batch_forwards: int = 0
    prefill_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    last_budget: int = 0
    active: int = 0

    @property
    def tau(self) -> float:
        return self.committed_tokens / self.sequence_forwards if self.sequence_forwards else 0.0


@dataclass
class StepInfo:
    """One batched step, for metrics hooks."""

    batch: int
    budget: int
    rows: int
    seconds: float
    committed: int


class _Sequence:
    """One request in the batch."""

    def __init__(self, ticket: int, request: ServeRequest, prompt_ids: list[int], max_new_tokens: int,
                 output: OutputTracker, drafter_name: str) -> None:
        self.ticket = ticket
        self.request = request
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.output = output
        self.generator = make_generator(request.params.seed, "cpu")
        self.ctx = DraftContext(list(prompt_ids), len(prompt_ids), request.params, self.generator)
        self.stats = GenerationStats(drafter=drafter_name)
        self.estimate = AcceptanceEstimate()
        self.session: NativeSession | None = None
        self.drafter: Drafter | None = None
        self.started = time.perf_counter()
        self.cancelled = False  # the caller is gone: no more events
        self.failed = False  # a Failed event was sent

    @property
    def room(self) -> int:
        """Draft nodes that can still be useful: tokens still wanted after the next bonus token."""
        return self.max_new_tokens - len(self.output.generated) - 1

    def emit(self, event: Event) -> bool:
        """Send ``event`` to the caller; False if the caller is gone (its sink raised)."""
        try:
            self.request.sink(event)
            return True
        except Exception:  # noqa: BLE001 - a closed event loop or a broken consumer: drop the sequence
            log.debug("sink of request %d failed; dropping it", self.ticket, exc_info=True)
            self.cancelled = True
            return False


class BatchScheduler:
    """Serves many requests at once with batched speculative decoding (see the module docstring).

    ``engine`` supplies the target, tokenizer, chat template and EOS ids (its own drafter is not used);
    ``drafter`` / ``drafter_options`` name the drafter built for each live sequence (None or "none": plain
    batched decoding). ``max_draft``: the largest draft budget per sequence. ``max_seq_len``: prompt +
    completion limit per request (default: the model's context). ``cost_curve``: ``c(rows)``; measured
    when the scheduler starts if not given."""

    def __init__(self, engine: Engine, drafter: str | None = None, drafter_options: dict[str, Any] | None = None,
                 max_batch: int = 8, max_draft: int = DEFAULT_MAX_DRAFT, max_seq_len: int | None = None,
                 cost_curve: CostCurve | None = None, max_waiting: int = 1024,
                 on_step: Callable[[StepInfo], None] | None = None) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidRequestError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_draft, int) or max_draft < 0:
            raise InvalidRequestError(f"max_draft must be an integer >= 0, got {max_draft!r}")
        check_drafter(drafter, drafter_options)
        self.engine = engine
        self.target = engine.loaded.target
        self.tokenizer = engine.tokenizer
        self.drafter_name = drafter if drafter not in (None, "", "none") else "none"
        self.drafter_options = dict(drafter_options or {})
        self.max_batch = max_batch
        self.max_draft = max_draft if self.drafter_name != "none" else 0
        context = self.target.max_context
        self.max_seq_len = min(context, max_seq_len) if max_seq_len else context
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.batched = isinstance(self.target, NativeCausalLM)
        self.stats = SchedulerStats()
        self._cost_curve = cost_curve
        self.policy: BatchBudgetPolicy | None = None
        self._pool: list[Drafter] = []
        self._drafters_built = 0
        if self.drafter_name != "none":  # build one now: bad drafter options fail at startup, not per request
            self._pool.append(self._build_drafter())
        self._cache = None
        self._plain: Engine | None = None
        if self.batched:
            self._cache = self.target.new_cache(self.max_seq_len + self.max_draft + 2, batch=max_batch)
        else:
            self._plain = Engine(engine.loaded, self._pool.pop() if self._pool else None)
            self._plain.eos_token_ids = engine.eos_token_ids
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._tickets = itertools.count(1)
        self._steps = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._submitting = threading.Lock()  # a submit's check and put vs. the shutdown's last drain
        self._ready = threading.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ public, any thread

    def start(self) -> BatchScheduler:
        """Start the scheduler thread and wait until it is ready (cost curve measured)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="quickdraft-scheduler", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self.error is not None:
                raise self.error
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running or waiting get a :class:`Failed` event (503). Waits up to
        ``timeout`` seconds for the thread; the scheduler counts as stopped afterwards either way."""
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: ServeRequest) -> int:
        """Queue ``request``; returns its ticket (for :meth:`cancel`). Events arrive through its sink, and the
        last one is always a :class:`Finished` or a :class:`Failed`. Raises :class:`InvalidRequestError` for a
        ``max_new_tokens`` below 1, :class:`SchedulerClosed` once the scheduler is not running and
        :class:`SchedulerBusy` when too many requests wait."""
        if request.max_new_tokens is not None:
            check_max_new_tokens(request.max_new_tokens)
        with self._submitting:  # the shutdown drains the inbox after taking this lock: nothing is put after
            if self._stopping or not self.running:
                raise SchedulerClosed("the scheduler is not running (it was closed or stopped by an error); "
                                      "no new requests are accepted")
            if self.queue_depth >= self.max_waiting:
                raise SchedulerBusy(f"{self.queue_depth} requests are already waiting; try again later")
            ticket = next(self._tickets)
            self._inbox.put(("submit", ticket, request))
        return ticket

    def cancel(self, ticket: int) -> None:
        """Drop a request (its client went away): its cache row and drafter are freed at the next step."""
        self._inbox.put(("cancel", ticket))

    @property
    def running(self) -> bool:
        """Whether the scheduler thread was started and is alive (it dies only on an error or :meth:`close`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests submitted but not yet decoding."""
        return self._inbox.qsize() + len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def cost_curve(self) -> CostCurve | None:
        return self._cost_curve

    # ------------------------------------------------------------------ the scheduler thread

    def _main(self) -> None:
        try:
            if self.batched and self.max_draft > 0:
                if self._cost_curve is None:
                    self._cost_curve = measure_batch_curve(self.target, self.max_batch * (1 + self.max_draft))
                self.policy = BatchBudgetPolicy(self._cost_curve, max_budget=self.max_draft)
        except BaseException as error:  # noqa: BLE001 - reported to start()
            self.error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stopping:
                self._drain(block=not self._active and not self._waiting)
                if self._stopping:
                    break
                if self.batched:
                    self._admit()
                    if self._active:
                        self._step_safely()
                elif self._waiting:
                    self._serve_plain(self._waiting.popleft())
        finally:
            self._shutdown()

    def _drain(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "stop":
            self._stopping = True
        elif kind == "submit":
            sequence = self._accept(command[1], command[2])
            if sequence is not None:
                self._waiting.append(sequence)
        elif kind == "cancel":
            self._cancel(command[1])

    def _accept(self, ticket: int, request: ServeRequest) -> _Sequence | None:
        """Tokenize and validate; send Admitted or Failed."""
        try:
            prompt_ids = self._encode(request.prompt)
            limit = self._limit(request, prompt_ids)
        except QuickdraftError as error:
            code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
            return self._refuse(request, Failed(str(error), 400, code))
        except Exception as error:  # noqa: BLE001 - a tokenizer or template failure answers this request only
            log.exception("could not tokenize request %d", ticket)
            return self._refuse(request, Failed(f"could not tokenize the prompt: {error}", 400, None))
        output = OutputTracker(self.tokenizer, self.engine.eos_token_ids, limit, request.stop)
        sequence = _Sequence(ticket, request, prompt_ids, limit, output, self.drafter_name)
        if not sequence.emit(Admitted(len(prompt_ids), limit)):
            return None
        return sequence

    def _refuse(self, request: ServeRequest, failure: Failed) -> None:
        self.stats.failed += 1
        _safe_emit(request, failure)

    def _limit(self, request: ServeRequest, prompt_ids: list[int]) -> int:
        """The tokens the request may generate: see :class:`ServeRequest` (``max_new_tokens``,
        ``fit_to_context``)."""
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty; pass at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens; shorten it so that at least one new token fits.")
        room = self.max_seq_len - len(prompt_ids)
        wanted = request.max_new_tokens
        if wanted is None:
            return room
        if wanted > room and not request.fit_to_context:
            where = "messages" if _is_messages(request.prompt) else "prompt"
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the {where}, {wanted} in the "
                f"completion). Please reduce the length of the {where} or completion.")
        return min(wanted, room)

    def _encode(self, prompt: str | list) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if _is_messages(prompt):
            return self.engine.encode_prompt(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.target.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
            return list(prompt)
        raise InvalidRequestError("the prompt must be text, chat messages or a list of token ids")

    def _cancel(self, ticket: int) -> None:
        for sequence in self._waiting:
            if sequence.ticket == ticket:
                self._waiting.remove(sequence)
                self.stats.cancelled += 1
                return
        for sequence in self._active:
            if sequence.ticket == ticket:
                sequence.cancelled = True
                if self.batched:  # the plain loop notices the flag between chunks
                    self._retire(sequence)
                return

    # -- batched decoding

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.max_batch:
            sequence = self._waiting.popleft()
            sequence.session = NativeSession(self.target, cache=self._cache, row=len(self._active))
            started = time.perf_counter()
            try:
                sequence.drafter = self._take_drafter()
                if sequence.drafter is not None:
                    if "target_session" in sequence.drafter.needs:
                        sequence.ctx.target = sequence.session
                    sequence.drafter.begin(sequence.ctx)
                logits = sequence.session.prefill(sequence.prompt_ids)
                first = choose(logits, sequence.request.params, sequence.generator)
            except Exception as error:  # noqa: BLE001 - fail this request, keep serving
                log.exception("prefill failed for request %d", sequence.ticket)
                self._release(sequence, reuse=False)  # the error may be the drafter's own begin()
                self._fail(sequence, f"prefill failed: {error}", 500, "internal_error")
                continue
            sequence.stats.prefill_seconds = time.perf_counter() - started
            sequence.stats.target_forwards = 1
            self.stats.admitted += 1
            self.stats.prefill_forwards += 1
            self.stats.sequence_forwards += 1
            self.stats.prompt_tokens += len(sequence.prompt_ids)
            sequence.ctx.tokens.append(first)
            self._active.append(sequence)
            self.stats.active = len(self._active)
            self._commit(sequence, [first])
            if sequence.output.done or sequence.cancelled:
                self._retire(sequence)

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as error:  # noqa: BLE001 - a failed forward fails the batch, not the server
            log.exception("batched step failed; failing %d requests", len(self._active))
            for sequence in list(reversed(self._active)):
                self._fail(sequence, f"generation failed: {error}", 500, "internal_error")

    def _step(self) -> None:
        sequences = list(self._active)
        budgets = self._choose_budgets(sequences)
        budget = max(budgets, default=0)
        trees = [self._propose(sequence, b) for sequence, b in zip(sequences, budgets)]
        hidden_layers = tuple(sorted({layer for s in sequences if s.drafter and "hidden_states" in s.drafter.needs
                                      for layer in s.drafter.hidden_layers}))
        started = time.perf_counter()
        outputs = verify_batch([s.session for s in sequences], [s.ctx.tokens[-1] for s in sequences], trees,
                               hidden_layers)
        seconds = time.perf_counter() - started
        self.stats.batch_forwards += 1
        committed = 0
        for sequence, tree, out in zip(sequences, trees, outputs):
            result = verify_sampling(tree, out.logits, sequence.request.params, sequence.generator)
            sequence.session.commit(result.accepted_nodes)
            sequence.estimate.update(tree.size, result.num_accepted)
            sequence.stats.target_forwards += 1
            sequence.stats.drafted_tokens += tree.size
            sequence.stats.accepted_tokens += result.num_accepted
            self.stats.sequence_forwards += 1
            self.stats.drafted_tokens += tree.size
            self.stats.accepted_tokens += result.num_accepted
            sequence.ctx.tokens.extend(result.tokens)
            if sequence.drafter is not None:
                logits = out.logits if "target_logits" in sequence.drafter.needs else None
                try:
                    sequence.drafter.observe(sequence.ctx, StepOutcome(tree, result, logits, out.hidden))
                except Exception:  # noqa: BLE001 - a drafter bug must not break lossless decoding
                    log.exception("drafter observe failed for request %d; it drafts no more", sequence.ticket)
                    self._release(sequence, reuse=False)
            committed += self._commit(sequence, result.tokens)
        if self.on_step is not None:
            rows = len(sequences) * (1 + max(t.size for t in trees))
            self.on_step(StepInfo(len(sequences), budget, rows, seconds, committed))
        for sequence in sorted(sequences, key=lambda s: s.session.row, reverse=True):
            if sequence.output.done or sequence.cancelled:
                self._retire(sequence)

    def _choose_budgets(self, sequences: list[_Sequence]) -> list[int]:
        """One budget for the batch from the policy. When it is 0, sequences with almost no acceptance data
        are still probed with a small budget now and then, so that a drafter that suits this traffic is
        discovered (the finished sequences' acceptance becomes the prior of new ones)."""
        self._steps += 1
        if self.policy is None:
            self.stats.last_budget = 0
            return [0] * len(sequences)
        drafting = [s for s in sequences if s.drafter is not None]
        rates = [self.policy.rate(s.estimate) for s in drafting]
        budget = self.policy.choose(rates, [s.room for s in drafting]) if drafting else 0
        self.stats.last_budget = budget
        if budget == 0 and self._steps % PROBE_EVERY == 0:
            return [min(PROBE_BUDGET, self.max_draft) if s.drafter is not None and s.estimate.tried < PROBE_UNTIL
                    else 0 for s in sequences]
        return [budget] * len(sequences)

    def _propose(self, sequence: _Sequence, budget: int) -> DraftTree:
        budget = min(budget, sequence.room)
        if budget <= 0 or sequence.drafter is None:
            return DraftTree.empty()
        try:
            return sequence.drafter.propose(sequence.ctx, budget).truncated(budget)
        except Exception:  # noqa: BLE001 - a drafter bug must not break lossless decoding
            log.exception("drafter propose failed for request %d; it drafts no more", sequence.ticket)
            self._release(sequence, reuse=False)
            return DraftTree.empty()

    def _commit(self, sequence: _Sequence, tokens: list[int]) -> int:
        chunk, committed = sequence.output.commit(tokens)
        sequence.stats.new_tokens += committed
        self.stats.committed_tokens += committed
        if chunk.text or chunk.token_ids:
            sequence.emit(Delta(chunk.text, chunk.token_ids))
        return committed

    def _fail(self, sequence: _Sequence, message: str, status: int, code: str | None) -> None:
        """End the sequence with an error: free its drafter and cache row, then send Failed (once)."""
        first = not sequence.failed
        sequence.failed = sequence.cancelled = True
        if self.batched and sequence in self._active:
            self._retire(sequence)
        else:
            self._release(sequence)
        if first:
            self.stats.failed += 1
            sequence.emit(Failed(message, status, code))

    def _retire(self, sequence: _Sequence) -> None:
        """The sequence is done, cancelled or failed: free its drafter and cache row, then send its last events.

        Freeing comes first so that a client that has its answer finds the scheduler already without it.
        """
        if sequence.failed:
            pass
        elif sequence.cancelled:
            self.stats.cancelled += 1
        else:
            sequence.stats.total_seconds = time.perf_counter() - sequence.started
            self.stats.finished += 1
            self.stats.completion_tokens += len(sequence.output.generated)
        self._release(sequence)
        self._free_row(sequence)
        if not sequence.cancelled:
            self._emit_finish(sequence)

    def _free_row(self, sequence: _Sequence) -> None:
        """Move the last active row into the sequence's cache row, so that active rows stay 0..n-1."""
        if sequence in self._active:
            row = sequence.session.row
            last = self._active[-1]
            if last is not sequence:
                self._cache.move_row(last.session.row, row)
                last.session.row = row
                self._active[row] = last
            else:
                self._cache.truncate(0, row)
            self._active.pop()
        self.stats.active = len(self._active)
        sequence.session = None

    def _emit_finish(self, sequence: _Sequence) -> None:
        tail = sequence.output.finish()
        if tail:
            sequence.emit(Delta(tail, []))
        sequence.emit(Finished(sequence.output.finish_reason, len(sequence.prompt_ids),
                               len(sequence.output.generated), sequence.stats))
        if self.policy is not None:
            self.policy.finished(sequence.estimate)

    def _release(self, sequence: _Sequence, reuse: bool = True) -> None:
        """End the sequence's drafter and pool it for a later request, unless ``reuse`` is False (it raised:
        its state may be broken) or it cannot end."""
        if sequence.drafter is None:
            return
        drafter, sequence.drafter = sequence.drafter, None
        try:
            drafter.end()
        except Exception:  # noqa: BLE001 - a drafter that cannot end is not reused
            log.exception("drafter end failed; discarding it")
            return
        if reuse:
            self._pool.append(drafter)

    def _take_drafter(self) -> Drafter | None:
        if self.drafter_name == "none":
            return None
        if self._pool:
            return self._pool.pop()
        return self._build_drafter()

    def _build_drafter(self) -> Drafter:
        self._drafters_built += 1
        return create_drafter(self.drafter_name,
                              DrafterSetup(self.target, self.tokenizer, dict(self.drafter_options)))

    # -- one at a time through the engine (targets without tree verification)

    def _serve_plain(self, sequence: _Sequence) -> None:
        """Serve one request through the engine loop. An error fails this request only; a request cut off by
        the shutdown fails with 503."""
        self.stats.admitted += 1
        self.stats.prompt_tokens += len(sequence.prompt_ids)
        self._active.append(sequence)
        self.stats.active = 1
        try:
            run = self._plain.start(sequence.prompt_ids, sequence.max_new_tokens, sequence.request.params,
                                    sequence.request.stop)
            complete = self._stream_plain(sequence, run)
        except Exception as error:  # noqa: BLE001 - fail this request, keep serving
            log.exception("generation failed for request %d", sequence.ticket)
            self._fail(sequence, f"generation failed: {error}", 500, "internal_error")
            return
        finally:
            self._active.clear()
            self.stats.active = 0
        if sequence.cancelled:
            self.stats.cancelled += 1
        elif not complete:
            self._fail(sequence, SHUTDOWN_MESSAGE, 503, "shutting_down")
        else:
            self._finish_plain(sequence, run.result())

    def _stream_plain(self, sequence: _Sequence, run: _Run) -> bool:
        """Send the run's chunks as they come; False if it was cut off (cancelled, or the scheduler stopping)."""
        chunks = run.chunks()
        try:
            for chunk in chunks:
                if chunk.text or chunk.token_ids:
                    sequence.emit(Delta(chunk.text, chunk.token_ids))
                self._drain(block=False)  # new requests queue up; a cancel marks this one
                if sequence.cancelled or self._stopping:
                    return False
            return True
        finally:
            chunks.close()

    def _finish_plain(self, sequence: _Sequence, result: GenerationResult) -> None:
        self.stats.finished += 1
        self.stats.completion_tokens += len(result.token_ids)
        self.stats.committed_tokens += result.stats.new_tokens
        self.stats.sequence_forwards += result.stats.target_forwards
        self.stats.drafted_tokens += result.stats.drafted_tokens
        self.stats.accepted_tokens += result.stats.accepted_tokens
        sequence.emit(Finished(result.finish_reason, len(sequence.prompt_ids), len(result.token_ids),
                               result.stats))

    def _shutdown(self) -> None:
        """Refuse new submits, then fail every request still queued, waiting or running."""
        with self._submitting:
            self._stopping = True
        self._drain(block=False)
        for sequence in list(reversed(self._active)) + list(self._waiting):
            self._fail(sequence, SHUTDOWN_MESSAGE, 503, "shutting_down")
        self._waiting.clear()
        self._active.clear()


def _is_messages(prompt: str | list) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _safe_emit(request: ServeRequest, event: Event) -> None:
    try:
        request.sink(event)
    except Exception:  # noqa: BLE001
        log.debug("sink failed", exc_info=True)
