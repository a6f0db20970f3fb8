"""Continuous batching with speculative decoding: many requests, one target forward per step.

A :class:`BatchScheduler` owns a KV cache of ``max_batch`` rows and runs in one background thread. Callers
(the HTTP server) :meth:`~BatchScheduler.submit` requests from any thread and receive events through a sink
callback; the scheduler never blocks on a caller.

Each iteration of the scheduler loop

1. takes new commands from its inbox: a new request is tokenized and validated (an :class:`Admitted` or a
   :class:`Failed` event goes out at once) and joins the waiting queue; a cancellation drops its sequence;
2. admits waiting requests into free cache rows: each newcomer gets a drafter and is prefilled on its own
   (:func:`~quickdraft.decoding.prefill`: one forward over its prompt into its row, its first token sampled
   and streamed), then joins the batch (continuous batching);
3. runs the one decoding step (:func:`~quickdraft.decoding.step`) for the whole batch, with budgets from
   :class:`~quickdraft.draft_budget.LoadAdaptiveBudget`: each sequence's drafter proposes, all trees are
   verified in ONE target forward (each row with its own cache length and tree mask), and each sequence
   commits its own accepted path (ragged acceptance) with its own sampling parameters and generator, lets its
   drafter observe, and sends a :class:`Delta` event with the released text;
4. retires the sequences that are done (EOS, token limit, stop string) or cancelled.

Finished or cancelled sequences free their row at once: the last live row is moved into the hole, so live
rows are always ``0 .. B - 1``. Drafters are kept in a pool of at most ``max_batch`` instances (one per live
sequence; ``begin``/``end`` per request), so cross-request state a drafter keeps survives and nothing is
built per request. A drafter that raised is ended and not reused (see :mod:`quickdraft.decoding`).

Targets without batched tree verification (the transformers fallback) go through the same admission, step
and retirement one request at a time, each with its own session and one forward per step.

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
from typing import Any

import torch

from quickdraft.batch_budget import measure_batch_curve
from quickdraft.budget import CostCurve
from quickdraft.decoding import OutputTracker, Sequence, StreamChunk, cache_slots, prefill, step
from quickdraft.draft_budget import DEFAULT_MAX_DRAFT, DraftBudget, FixedBudget, LoadAdaptiveBudget
from quickdraft.drafters import Drafter, DrafterSetup, create_drafter
from quickdraft.engine import Engine, check_drafter, check_max_new_tokens, check_prompt, fit_to_context
from quickdraft.errors import ContextLengthError, InvalidRequestError, QuickdraftError
from quickdraft.models.base import TargetSession
from quickdraft.models.native import NativeCausalLM, NativeSession
from quickdraft.types import GenerationStats, SamplingParams

log = logging.getLogger(__name__)

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


Event = Admitted | Delta | Finished | Failed


class SchedulerBusy(QuickdraftError):
    """Too many requests are waiting; try again later."""


class SchedulerClosed(SchedulerBusy):
    """The scheduler is not running (not started, closing or closed, or stopped by an error)."""


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
    last_budget: int = 0  # the largest draft budget given to a sequence in the last step
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


class _Sequence(Sequence):
    """One request in the scheduler: the decoding state, its ticket and request, and whether its caller is
    still there."""

    def __init__(self, ticket: int, request: ServeRequest, prompt_ids: list[int], output: OutputTracker,
                 drafter_name: str) -> None:
        super().__init__(prompt_ids, request.params, output, drafter_name)
        self.ticket = ticket
        self.request = request
        self.cancelled = False  # the caller is gone: no more events
        self.failed = False  # a Failed event was sent

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
    when the scheduler starts if not given. ``batched``: whether the target verifies many sequences in one
    forward (the native forward); otherwise (the transformers fallback) one request is decoded at a time.
    ``threads``: torch CPU threads for the scheduler thread, which does all decoding (None: leave torch's
    setting); see :func:`quickdraft.devices.leave_cpu_threads_to_a_worker`."""

    def __init__(self, engine: Engine, drafter: str | None = None, drafter_options: dict[str, Any] | None = None,
                 max_batch: int = 8, max_draft: int = DEFAULT_MAX_DRAFT, max_seq_len: int | None = None,
                 cost_curve: CostCurve | None = None, max_waiting: int = 1024,
                 on_step: Callable[[StepInfo], None] | None = None, threads: int | None = None) -> None:
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
        self.threads = threads
        self.batched = isinstance(self.target, NativeCausalLM)
        self.capacity = max_batch if self.batched else 1  # sequences decoded at once
        self.stats = SchedulerStats()
        self._cost_curve = cost_curve
        self.policy: DraftBudget = FixedBudget(0)
        self._pool: list[Drafter] = []
        if self.drafter_name != "none":  # build one now: bad drafter options fail at startup, not per request
            self._pool.append(self._build_drafter())
        self._slots = cache_slots(self.max_seq_len, self.max_draft)
        self._cache = self.target.new_cache(self._slots, batch=max_batch) if self.batched else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._tickets = itertools.count(1)
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
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.max_draft > 0:
                if self._cost_curve is None:
                    self._cost_curve = measure_batch_curve(self.target, self.capacity * (1 + self.max_draft))
                self.policy = LoadAdaptiveBudget(self._cost_curve, self.max_draft)
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
                self._admit()
                if self._active:
                    self._step_safely()
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
        sequence = _Sequence(ticket, request, prompt_ids, output, self.drafter_name)
        if not sequence.emit(Admitted(len(prompt_ids), limit)):
            return None
        return sequence

    def _refuse(self, request: ServeRequest, failure: Failed) -> None:
        self.stats.failed += 1
        _safe_emit(request, failure)

    def _limit(self, request: ServeRequest, prompt_ids: list[int]) -> int:
        """The tokens the request may generate: see :class:`ServeRequest` (``max_new_tokens``,
        ``fit_to_context``)."""
        check_prompt(prompt_ids)
        where = "messages" if _is_messages(request.prompt) else "prompt"
        return fit_to_context(len(prompt_ids), request.max_new_tokens, self.max_seq_len, request.fit_to_context,
                              where)

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
                self._retire(sequence)
                return

    # -- decoding: admit, step, retire

    def _admit(self) -> None:
        """Prefill waiting requests into free rows; a request whose start fails fails alone."""
        while self._waiting and len(self._active) < self.capacity:
            sequence = self._waiting.popleft()
            try:
                sequence.attach(self._open_session(len(self._active)), self._take_drafter())
                chunk = prefill(sequence)
            except Exception as error:  # noqa: BLE001 - fail this request, keep serving
                log.exception("prefill failed for request %d", sequence.ticket)
                self._release(sequence, reuse=False)  # the error may be the drafter's own begin()
                self._fail(sequence, f"prefill failed: {error}", 500, "internal_error")
                continue
            self.stats.admitted += 1
            self.stats.prefill_forwards += 1
            self.stats.sequence_forwards += 1
            self.stats.prompt_tokens += len(sequence.prompt_ids)
            self.stats.committed_tokens += sequence.stats.new_tokens
            self._active.append(sequence)
            self.stats.active = len(self._active)
            self._deliver(sequence, chunk)
            if sequence.done or sequence.cancelled:
                self._retire(sequence)

    def _open_session(self, row: int) -> TargetSession:
        """A view on cache row ``row`` (batched), or a session with its own cache (the fallback)."""
        if self._cache is not None:
            return NativeSession(self.target, cache=self._cache, row=row)
        return self.target.new_session(self._slots)

    def _step_safely(self) -> None:
        try:
            self._step()
        except Exception as error:  # noqa: BLE001 - a failed forward fails the batch, not the server
            log.exception("step failed; failing %d requests", len(self._active))
            for sequence in list(reversed(self._active)):
                self._fail(sequence, f"generation failed: {error}", 500, "internal_error")

    def _step(self) -> None:
        sequences = list(self._active)
        budgets = self.policy.choose(sequences)
        report = step(sequences, budgets)
        self.stats.last_budget = max(budgets, default=0)
        self.stats.batch_forwards += 1
        self.stats.sequence_forwards += len(sequences)
        self.stats.drafted_tokens += report.drafted
        self.stats.accepted_tokens += report.accepted
        self.stats.committed_tokens += report.committed
        for sequence, chunk in zip(sequences, report.chunks):
            self._deliver(sequence, chunk)
        if self.on_step is not None:
            self.on_step(StepInfo(len(sequences), self.stats.last_budget, report.rows, report.seconds,
                                  report.committed))
        for sequence in reversed(sequences):  # the last rows first: a row moved into a hole is not retired after
            if sequence.done or sequence.cancelled:
                self._retire(sequence)

    def _deliver(self, sequence: _Sequence, chunk: StreamChunk) -> None:
        if chunk.text or chunk.token_ids:
            sequence.emit(Delta(chunk.text, chunk.token_ids))

    def _fail(self, sequence: _Sequence, message: str, status: int, code: str | None) -> None:
        """End the sequence with an error: free its drafter and cache row, then send Failed (once)."""
        first = not sequence.failed
        sequence.failed = sequence.cancelled = True
        self._retire(sequence)
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
        """Close the sequence's session. In the shared cache, the last active row moves into its row, so that
        active rows stay 0..n-1."""
        session, sequence.session = sequence.session, None
        if sequence in self._active:
            row = self._active.index(sequence)
            last = self._active.pop()
            if last is not sequence:
                self._cache.move_row(last.session.row, row)
                last.session.row = row
                self._active[row] = last
                session = None  # its row now holds the moved sequence
        if session is not None:
            session.close()
        self.stats.active = len(self._active)

    def _emit_finish(self, sequence: _Sequence) -> None:
        tail = sequence.output.finish()
        if tail:
            sequence.emit(Delta(tail, []))
        sequence.emit(Finished(sequence.output.finish_reason, len(sequence.prompt_ids),
                               len(sequence.output.generated), sequence.stats))
        self.policy.finished(sequence)

    def _release(self, sequence: _Sequence, reuse: bool = True) -> None:
        """End the sequence's drafter and pool it for a later request, unless ``reuse`` is False (its state
        may be broken) or it cannot end. A drafter dropped during the step was ended then and is not pooled."""
        drafter = sequence.release_drafter()
        if drafter is not None and reuse:
            self._pool.append(drafter)

    def _take_drafter(self) -> Drafter | None:
        if self.drafter_name == "none":
            return None
        if self._pool:
            return self._pool.pop()
        return self._build_drafter()

    def _build_drafter(self) -> Drafter:
        return create_drafter(self.drafter_name,
                              DrafterSetup(self.target, self.tokenizer, dict(self.drafter_options)))

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
