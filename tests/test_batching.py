"""Batched verification and the batch scheduler: one forward over ragged rows equals per-sequence forwards,
and every request served in a batch gets exactly what plain decoding gives it."""

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from quickdraft.batch_budget import AcceptanceEstimate, BatchBudgetPolicy
from quickdraft.batching import Admitted, BatchScheduler, Delta, Failed, Finished, ServeRequest
from quickdraft.budget import CostCurve, chain_accepted
from quickdraft.drafters import available_drafters, register
from quickdraft.drafters.base import Drafter
from quickdraft.heads import new_head
from quickdraft.kv import StaticKVCache
from quickdraft.models.native import NativeCausalLM
from quickdraft.models.native_session import NativeSession, verify_batch
from quickdraft.types import DraftTree, SamplingParams

from conftest import TINY_VOCAB, perturbed_copy, registered, tiny_engine, tiny_hf_model

PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3],
    [40, 41, 42, 40, 41, 42, 43, 44, 40],
    [70, 3, 70, 3, 70],
    [9],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 20, 21],
    [60, 61, 60, 61, 60, 61, 62],
    [11, 12, 13, 11, 12, 13, 11, 12, 13, 14, 15],
]
LENGTHS = [30, 45, 12, 60, 7, 33, 50, 20]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_verify_batch_matches_per_sequence_verification_with_ragged_lengths_and_trees(architecture):
    model = NativeCausalLM(tiny_hf_model(architecture))
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 23, 9, 1]
    prompts = [torch.randint(0, 90, (n,), generator=generator).tolist() for n in lengths]
    trees = [
        DraftTree.from_paths([[1, 2, 3], [1, 4], [7, 8, 9, 10]]),
        DraftTree.empty(),
        DraftTree.chain([3, 4, 5, 6, 7, 8]),
        DraftTree.from_paths([[50], [51], [52, 53]]),
    ]
    cache = model.new_cache(64, batch=len(prompts))
    views = [NativeSession(model, cache=cache, row=i) for i in range(len(prompts))]
    for view, prompt in zip(views, prompts):
        view.prefill(prompt[:-1]) if len(prompt) > 1 else None
    outputs = verify_batch(views, [p[-1] for p in prompts], trees)
    alone = []
    for prompt, tree, out in zip(prompts, trees, outputs):
        session = model.new_session(64)
        if len(prompt) > 1:
            session.prefill(prompt[:-1])
        expected = session.verify(prompt[-1], tree)
        assert out.logits.shape == expected.logits.shape == (tree.size + 1, model.vocab_size)
        assert (out.logits - expected.logits).abs().max() < 1e-4
        alone.append(session)
    # Ragged acceptance: each row keeps its own accepted path, then a second batched step still matches.
    accepted = [[0, 1, 2], [], [0, 1], [2, 3]]
    for view, session, nodes in zip(views, alone, accepted):
        view.commit(nodes)
        session.commit(nodes)
        assert view.cached_length == session.cached_length
    second = [DraftTree.chain([9, 9]), DraftTree.from_paths([[4, 5], [6]]), DraftTree.empty(), DraftTree.chain([1])]
    outputs = verify_batch(views, [31, 32, 33, 34], second)
    for session, tree, root, out in zip(alone, second, [31, 32, 33, 34], outputs):
        assert (out.logits - session.verify(root, tree).logits).abs().max() < 1e-4


def test_ragged_cache_writes_and_row_moves():
    cache = StaticKVCache(num_layers=1, batch=3, num_kv_heads=1, max_len=8, head_dim=1, dtype=torch.float32)
    cache.lengths = [2, 0, 5]
    values = torch.arange(6, dtype=torch.float32).view(3, 1, 2, 1) + 1
    slots = cache.ragged_slots(cache.lengths, 2, slice(0, 3))
    cache.write_ragged(0, values, -values, slots)
    assert cache.keys[0, 0, 0, 2:4, 0].tolist() == [1, 2]
    assert cache.keys[0, 1, 0, 0:2, 0].tolist() == [3, 4]
    assert cache.values[0, 2, 0, 5:7, 0].tolist() == [-5, -6]
    cache.lengths = [4, 2, 7]
    cache.move_row(2, 0)
    assert cache.lengths == [7, 2, 0] and cache.keys[0, 0, 0, 5:7, 0].tolist() == [5, 6]
    with pytest.raises(ValueError, match="overflow"):
        cache.ragged_slots([7, 0], 2, slice(0, 2))


def test_budget_policy_speculates_when_cheap_and_stops_when_the_batch_makes_it_expensive():
    flat = BatchBudgetPolicy(CostCurve.flat(), max_budget=16)
    assert flat.choose([0.8] * 8, [100] * 8) == 16
    linear = BatchBudgetPolicy(CostCurve((1, 2, 512), (1.0, 2.0, 512.0)), max_budget=16)
    assert linear.choose([0.8] * 8, [100] * 8) == 0  # every extra row costs a full row: never pays
    knee = BatchBudgetPolicy(CostCurve((1, 8, 16, 64, 256), (1.0, 1.05, 1.2, 4.0, 16.0)), max_budget=16)
    alone = knee.choose([0.8], [100])
    crowded = knee.choose([0.8] * 16, [100] * 16)
    assert alone >= 4 and crowded < alone
    assert knee.choose([0.05], [100]) < alone  # a drafter that is rarely right gets less
    assert flat.choose([0.8, 0.8], [0, 0]) == 0  # no room left: nothing to draft
    assert chain_accepted(0.5, 2) == pytest.approx(0.75)
    estimate = AcceptanceEstimate()
    estimate.update(4, 1)  # one accepted, then one rejected: 2 tried
    estimate.update(3, 3)
    assert (estimate.accepted, estimate.tried) == (4, 5)


class Collector:
    """Collects one request's events (called from the scheduler thread)."""

    def __init__(self) -> None:
        self.events = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, (Finished, Failed)):
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if isinstance(e, Delta) for t in e.token_ids]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def final(self):
        return self.events[-1]


def serve_all(scheduler, prompts, lengths, params=None, stop=None):
    collectors = []
    for prompt, length in zip(prompts, lengths):
        collector = Collector()
        scheduler.submit(ServeRequest(prompt, length, params or SamplingParams(), list(stop or []), collector))
        collectors.append(collector)
    for collector in collectors:
        assert collector.done.wait(60), "a request never finished"
    return collectors


@pytest.mark.parametrize("drafter, curve", [("ngram", CostCurve.flat()), ("suffix", None), ("none", None)])
def test_concurrent_greedy_requests_equal_plain_decoding(drafter, curve):
    engine = tiny_engine("llama")
    expected = [engine.generate_ids(p, n) for p, n in zip(PROMPTS, LENGTHS)]
    scheduler = BatchScheduler(engine, drafter, max_batch=4, cost_curve=curve).start()
    try:
        collectors = serve_all(scheduler, PROMPTS, LENGTHS)
        for collector, want in zip(collectors, expected):
            assert isinstance(collector.events[0], Admitted)
            assert collector.tokens == want.token_ids
            assert collector.text == want.text
            assert collector.final.finish_reason == want.finish_reason
            assert collector.final.completion_tokens == len(want.token_ids)
        stats = scheduler.stats
        assert stats.finished == len(PROMPTS) and scheduler.active == 0
        assert stats.batch_forwards < sum(len(w.token_ids) for w in expected)  # sequences shared forwards
        if drafter == "ngram":
            assert stats.accepted_tokens > 0 and stats.tau > 1.0
    finally:
        scheduler.close()


def batch_drafters() -> list[str]:
    return [n for n in available_drafters() if n not in ("xvocab", "ngram", "suffix") and not n.startswith("test-")]


@pytest.mark.parametrize("drafter", batch_drafters())
def test_every_drafter_is_lossless_in_a_batch(drafter):
    """Drafters that need target logits or the target's own session (self-speculation on its cache row)
    work per sequence inside a batch."""
    engine = tiny_engine("qwen2")
    options = {"model": NativeCausalLM(perturbed_copy(engine.hf_model))} if drafter == "draft" else None
    if drafter in ("eagle", "medusa"):  # an untrained head: no shipped head fits a tiny model
        options = {"head": new_head(drafter, engine.loaded.target, engine.tokenizer, list(range(TINY_VOCAB)))}
    expected = [engine.generate_ids(p, n).token_ids for p, n in zip(PROMPTS[:5], LENGTHS[:5])]
    scheduler = BatchScheduler(engine, drafter, options, max_batch=3, max_draft=8, cost_curve=CostCurve.flat())
    try:
        got = serve_all(scheduler.start(), PROMPTS[:5], LENGTHS[:5])
        assert [c.tokens for c in got] == expected
        assert scheduler.stats.drafted_tokens > 0
    finally:
        scheduler.close()


def test_stop_strings_and_seeded_sampling_match_the_engine():
    engine = tiny_engine("llama")
    engine.eos_token_ids = frozenset()
    full = engine.generate_ids(PROMPTS[1], 40)
    stop = full.text[10:13]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    sampled = [engine.generate_ids(p, 25, SamplingParams(temperature=0.8, top_p=0.9, seed=5)) for p in PROMPTS[:4]]
    scheduler = BatchScheduler(engine, None, max_batch=3).start()
    try:
        [cut] = serve_all(scheduler, [PROMPTS[1]], [40], stop=[stop])
        assert cut.text == full.text[: full.text.index(stop)] and cut.final.finish_reason == "stop"
        # Plain batched decoding draws from each request's own generator exactly as the engine does.
        got = serve_all(scheduler, PROMPTS[:4], [25] * 4, params)
        assert [c.tokens for c in got] == [s.token_ids for s in sampled]
    finally:
        scheduler.close()


def test_bad_requests_fail_alone_and_long_requests_are_clamped():
    engine = tiny_engine("llama")
    scheduler = BatchScheduler(engine, "ngram", max_batch=2, max_seq_len=64, cost_curve=CostCurve.flat()).start()
    try:
        too_long, empty, bad_id, clamped, good = serve_all(
            scheduler, [[1] * 64, [], [500], [1, 2, 3] * 20, PROMPTS[0]], [5, 5, 5, 100, 10])
        assert isinstance(too_long.final, Failed) and too_long.final.code == "context_length_exceeded"
        assert isinstance(empty.final, Failed) and "empty" in empty.final.message
        assert isinstance(bad_id.final, Failed) and "vocabulary" in bad_id.final.message
        assert clamped.events[0].max_new_tokens == 4
        assert len(clamped.tokens) <= 4
        assert good.tokens == engine.generate_ids(PROMPTS[0], 10).token_ids
    finally:
        scheduler.close()


class SlowCountingDrafter(Drafter):
    """Proposes nothing, slowly; counts instances built and begin/end calls across all instances, and keeps
    the instance that began last."""

    built = 0
    begun = 0
    ended = 0
    last_begun = None

    def __init__(self):
        type(self).built += 1

    def begin(self, ctx):
        type(self).begun += 1
        type(self).last_begun = self

    def propose(self, ctx, budget):
        time.sleep(0.01)
        return DraftTree.empty()

    def end(self):
        type(self).ended += 1


class OutOfVocabularyDrafter(SlowCountingDrafter):
    """Proposes a token the target has no embedding for, so the batched verification forward fails."""

    def propose(self, ctx, budget):
        return DraftTree.chain([10**6])


class RaisingDrafter(SlowCountingDrafter):
    """Raises on its first proposal."""

    def propose(self, ctx, budget):
        raise RuntimeError("drafter bug")


class RaisingAtBeginDrafter(SlowCountingDrafter):
    """Raises when a request begins."""

    def begin(self, ctx):
        type(self).last_begun = self
        raise RuntimeError("drafter bug")


@pytest.fixture(autouse=True, scope="module")
def test_drafters():
    """This module's test drafters, in the registry while its tests run."""
    with registered({"test-slow-counting": SlowCountingDrafter, "test-out-of-vocabulary": OutOfVocabularyDrafter,
                     "test-raising": RaisingDrafter, "test-raising-at-begin": RaisingAtBeginDrafter}):
        yield


class StateAtFinish(Collector):
    """Also records the scheduler's active rows and the drafters' end count when the Finished or Failed event
    arrives."""

    def __init__(self, scheduler, drafter_class=SlowCountingDrafter) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.drafter_class = drafter_class
        self.seen = None

    def __call__(self, event) -> None:
        if isinstance(event, (Finished, Failed)):
            self.seen = (self.scheduler.active, self.drafter_class.ended)
        super().__call__(event)


def test_cancel_frees_the_slot_and_ends_the_drafter_at_once():
    engine = tiny_engine("llama")
    engine.eos_token_ids = frozenset()
    built = SlowCountingDrafter.built
    scheduler = BatchScheduler(engine, "test-slow-counting", max_batch=2, cost_curve=CostCurve.flat()).start()
    try:
        ended = SlowCountingDrafter.ended
        collector = Collector()
        ticket = scheduler.submit(ServeRequest(PROMPTS[0], 400, SamplingParams(), [], collector))
        deadline = time.monotonic() + 10
        while not any(isinstance(e, Delta) for e in collector.events) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active == 1
        scheduler.cancel(ticket)
        deadline = time.monotonic() + 5
        while scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active == 0 and scheduler.stats.cancelled == 1
        assert SlowCountingDrafter.ended == ended + 1
        assert not collector.done.is_set()  # a cancelled request gets no more events
        after = StateAtFinish(scheduler)
        scheduler.submit(ServeRequest(PROMPTS[2], 8, SamplingParams(), [], after))
        assert after.done.wait(60)
        assert after.tokens == engine.generate_ids(PROMPTS[2], 8).token_ids
        # A client that has its answer finds the request's row and drafter already freed.
        assert after.seen == (0, ended + 2)
        assert SlowCountingDrafter.built - built <= 2  # drafters are pooled, not built per request
    finally:
        scheduler.close()


def test_the_scheduler_reads_drafter_evidence_and_records_draft_time():
    class Evidencing(SlowCountingDrafter):
        """Reports evidence 1 and counts how often it is asked."""

        asked = 0

        def evidence(self, ctx):
            type(self).asked += 1
            return 1

    register("test-evidencing")(Evidencing)
    with running_scheduler("test-evidencing") as scheduler:
        [alone] = serve_all(scheduler, [PROMPTS[0]], [10])
        assert Evidencing.asked >= 1  # the budget policy read it before each step
        assert isinstance(alone.final, Finished) and alone.final.stats.draft_seconds >= 0.01
        assert alone.tokens == tiny_engine("llama").generate_ids(PROMPTS[0], 10).token_ids


@contextmanager
def running_scheduler(drafter: str):
    """A started two-slot scheduler on the tiny llama engine with ``drafter``, closed afterwards."""
    scheduler = BatchScheduler(tiny_engine("llama"), drafter, max_batch=2, cost_curve=CostCurve.flat()).start()
    try:
        yield scheduler
    finally:
        scheduler.close()


def test_a_failed_step_frees_the_slot_and_ends_the_drafter_before_the_error_is_sent():
    with running_scheduler("test-out-of-vocabulary") as scheduler:
        ended = OutOfVocabularyDrafter.ended
        failing = StateAtFinish(scheduler, OutOfVocabularyDrafter)
        scheduler.submit(ServeRequest(PROMPTS[0], 20, SamplingParams(), [], failing))
        assert failing.done.wait(60)
        assert isinstance(failing.final, Failed) and failing.final.code == "internal_error"
        assert failing.seen == (0, ended + 1)
        assert scheduler.stats.failed == 1


def test_a_drafter_that_raises_is_ended_and_not_reused_and_the_request_stays_lossless():
    with running_scheduler("test-raising") as scheduler:
        ended = RaisingDrafter.ended
        [got] = serve_all(scheduler, [PROMPTS[0]], [12])
        assert got.tokens == tiny_engine("llama").generate_ids(PROMPTS[0], 12).token_ids
        assert RaisingDrafter.ended == ended + 1
        raised = RaisingDrafter.last_begun
        [again] = serve_all(scheduler, [PROMPTS[1]], [12])  # the next request gets a new drafter
        assert again.tokens == tiny_engine("llama").generate_ids(PROMPTS[1], 12).token_ids
        assert RaisingDrafter.last_begun is not raised


def test_a_drafter_that_raises_at_begin_fails_the_request_alone_and_is_not_reused():
    with running_scheduler("test-raising-at-begin") as scheduler:
        [failed] = serve_all(scheduler, [PROMPTS[0]], [12])
        assert isinstance(failed.final, Failed) and "prefill failed" in failed.final.message
        assert scheduler.active == 0
        raised = RaisingAtBeginDrafter.last_begun
        [again] = serve_all(scheduler, [PROMPTS[1]], [12])  # the next request gets a new drafter
        assert isinstance(again.final, Failed) and RaisingAtBeginDrafter.last_begun is not raised


def test_transformers_fallback_is_served_one_request_at_a_time():
    engine = tiny_engine("llama", native=False)
    expected = [engine.generate_ids(p, n).token_ids for p, n in zip(PROMPTS[:3], LENGTHS[:3])]
    scheduler = BatchScheduler(engine, "ngram", max_batch=4).start()
    try:
        assert not scheduler.batched
        got = serve_all(scheduler, PROMPTS[:3], LENGTHS[:3])
        assert [c.tokens for c in got] == expected
    finally:
        scheduler.close()


# ---------------------------------------------------------------------- shutdown, fallback and limit faults


class DelayedSubmits:
    """Wraps a scheduler's inbox so that each submit is queued late: a caller preempted between
    :meth:`BatchScheduler.submit`'s checks and its put, while the scheduler closes."""

    def __init__(self, inbox, delay: float) -> None:
        self.inbox = inbox
        self.delay = delay

    def put(self, command) -> None:
        if command[0] == "submit":
            time.sleep(self.delay)
        self.inbox.put(command)

    def __getattr__(self, name):
        return getattr(self.inbox, name)


def test_a_request_submitted_while_the_scheduler_closes_is_answered_or_refused():
    from quickdraft.batching import SchedulerBusy

    scheduler = BatchScheduler(tiny_engine("llama"), None, max_batch=1).start()
    scheduler._inbox = DelayedSubmits(scheduler._inbox, 0.5)
    collector = Collector()
    refused = []

    def submit() -> None:
        try:
            scheduler.submit(ServeRequest(PROMPTS[0], 5, SamplingParams(), [], collector))
        except SchedulerBusy as error:
            refused.append(error)

    submitter = threading.Thread(target=submit)
    submitter.start()
    time.sleep(0.1)  # the submit has passed its checks and is queueing
    scheduler.close()
    submitter.join(10)
    assert refused or collector.done.wait(5), "a request accepted while the scheduler closed was never answered"
    if not refused:
        assert isinstance(collector.final, Failed) and collector.final.status == 503


def test_a_submit_after_close_is_refused_with_a_clear_error():
    from quickdraft.batching import SchedulerClosed

    scheduler = BatchScheduler(tiny_engine("llama"), None, max_batch=1).start()
    scheduler.close()
    with pytest.raises(SchedulerClosed, match="not running"):
        scheduler.submit(ServeRequest(PROMPTS[0], 5))


def test_a_fallback_request_whose_start_raises_fails_alone_and_the_scheduler_keeps_serving():
    engine = tiny_engine("llama", native=False)
    scheduler = BatchScheduler(engine, None, max_batch=2).start()
    try:
        target = engine.loaded.target
        new_session = target.new_session
        calls = []

        def failing_start(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("start failed")
            return new_session(*args, **kwargs)

        target.new_session = failing_start
        [bad] = serve_all(scheduler, [PROMPTS[0]], [5])
        assert isinstance(bad.final, Failed) and bad.final.status == 500 and "start failed" in bad.final.message
        assert scheduler.running
        [good] = serve_all(scheduler, [PROMPTS[1]], [6])
        assert good.tokens == engine.generate_ids(PROMPTS[1], 6).token_ids
        assert scheduler.stats.failed == 1 and scheduler.active == 0
    finally:
        scheduler.close()


def test_a_fallback_request_cut_off_by_shutdown_is_an_error_not_a_completion():
    engine = tiny_engine("llama", native=False)
    engine.eos_token_ids = frozenset()
    scheduler = BatchScheduler(engine, "test-slow-counting", max_batch=2).start()
    collector = Collector()
    scheduler.submit(ServeRequest(PROMPTS[0], 400, SamplingParams(), [], collector))
    deadline = time.monotonic() + 10
    while not collector.tokens and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.close()
    assert collector.done.wait(5)
    assert isinstance(collector.final, Failed), f"cut off after {len(collector.tokens)} of 400 tokens, " \
                                                 f"reported as {collector.final}"
    assert collector.final.status == 503 and collector.final.code == "shutting_down"


@pytest.mark.parametrize("native", [True, False])
def test_max_new_tokens_below_one_is_refused_like_the_engine(native):
    from quickdraft.errors import InvalidRequestError

    with _short_context_scheduler(native) as scheduler:
        for bad in (0, -1, True, 2.5):
            with pytest.raises(InvalidRequestError, match=f"max_new_tokens must be an integer >= 1, got {bad!r}"):
                scheduler.submit(ServeRequest(PROMPTS[0], bad, sink=Collector()))
        assert scheduler.stats.failed == 0 and scheduler.queue_depth == 0 and scheduler.running
        [got] = serve_all(scheduler, [PROMPTS[0]], [None])
        assert isinstance(got.final, Finished) and got.final.completion_tokens <= 8


@contextmanager
def _short_context_scheduler(native: bool):
    """A one-slot scheduler (batched, or the transformers fallback) with room for 8 new tokens after PROMPTS[0]."""
    scheduler = BatchScheduler(tiny_engine("llama", native=native), None, max_batch=1,
                               max_seq_len=len(PROMPTS[0]) + 8).start()
    try:
        yield scheduler
    finally:
        scheduler.close()


def test_max_new_tokens_over_the_context_fails_when_the_request_asks_not_to_be_clamped():
    engine = tiny_engine("llama")
    scheduler = BatchScheduler(engine, None, max_batch=2, max_seq_len=64).start()
    try:
        collectors = []
        for prompt, length, fit in ([[1, 2, 3] * 20, 100, False], [[1, 2, 3] * 20, 4, False],
                                    [[1, 2, 3] * 20, 100, True]):
            collector = Collector()
            scheduler.submit(ServeRequest(prompt, length, SamplingParams(), [], collector, fit_to_context=fit))
            collectors.append(collector)
        assert all(c.done.wait(60) for c in collectors)
        refused, fits, clamped = collectors
        assert isinstance(refused.final, Failed) and refused.final.code == "context_length_exceeded"
        assert refused.final.message.startswith(
            "This model's maximum context length is 64 tokens. However, you requested 160 tokens (60 in the "
            "prompt, 100 in the completion).")
        assert isinstance(fits.final, Finished) and isinstance(clamped.final, Finished)
        assert clamped.events[0].max_new_tokens == 4
    finally:
        scheduler.close()


def test_the_scheduler_thread_decodes_with_the_threads_it_is_given():
    """``threads`` sets torch's thread count on the scheduler thread (the one that decodes), not the caller's:
    a server leaves its main thread one thread (quickdraft.devices.leave_cpu_threads_to_a_worker)."""
    decoding_threads: list[int] = []
    caller_threads = torch.get_num_threads()
    wanted = 2 if caller_threads == 1 else 1
    scheduler = BatchScheduler(tiny_engine("llama"), None, max_batch=2, cost_curve=CostCurve.flat(), threads=wanted,
                               on_step=lambda info: decoding_threads.append(torch.get_num_threads())).start()
    try:
        serve_all(scheduler, PROMPTS[:1], [6])
    finally:
        scheduler.close()
    assert decoding_threads and set(decoding_threads) == {wanted}
    assert torch.get_num_threads() == caller_threads
