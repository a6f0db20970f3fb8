"""The benchmark loop: warm-up, then every question with all methods back to back.

Measurement rules:

- Each method generates once on a warm-up prompt (:data:`~quickdraft.bench.prompts.WARMUP_PROMPT`, not part of
  the timed set) before anything is timed.
- For each question and turn, all methods run back to back (interleaved), so any drift of the machine
  (thermal, background load) hits all methods alike.
- The order in which the methods run is shuffled per question (the same order for all its turns), from the
  run's seed, so no method always runs first or right after another (cache warmth, order effects). The
  *run order* of a question is the list of method names in the order they ran; the same seed gives the same
  run orders (:func:`run_orders`), and :attr:`BenchRun.run_orders` keeps them for the report.
- Prompts are tokenized once per question and turn, before timing, and every method receives the same ids.
- Nothing is shared across methods: each has its own runner (own Engine and drafter state, fresh caches).

Multi-turn questions: turn 1 is asked as ``[user: turn1]``; every method answers it (and is timed on it).
The conversation for turn 2 is then built from the *baseline's* turn-1 answer,
``[user: turn1, assistant: ar's answer, user: turn2]``, and every method answers turn 2 from that same
conversation (and is timed on it), so all methods see identical turn-2 prompts and their outputs stay
comparable token for token. Later turns follow the same rule.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from quickdraft.bench.dataset import Question
from quickdraft.bench.prompts import WARMUP_PROMPT
from quickdraft.bench.runners import BASELINE, MethodOutput, MethodRunner
from quickdraft.engine import check_max_new_tokens
from quickdraft.errors import InvalidRequestError
from quickdraft.types import SamplingParams

Messages = list[dict[str, str]]


class Conversation(Protocol):
    """How the harness turns chat messages into prompt ids and answers back into text."""

    def encode(self, messages: Messages) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class EngineConversation:
    """:class:`Conversation` through an Engine: its chat template and its tokenizer."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def encode(self, messages: Messages) -> list[int]:
        return list(self.engine.encode_prompt(messages))

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids, skip_special_tokens=True)


@dataclass
class Record:
    """One timed generation: which method, question and turn (0-based), and what it produced."""

    method: str
    question_id: int | str
    category: str
    group: str
    turn: int
    output: MethodOutput


@dataclass
class BenchRun:
    """Everything a benchmark run measured; ``prompts[(question_id, turn)]`` are the prompt ids and
    ``run_orders[question_id]`` the question's run order (method names in the order they ran)."""

    methods: list[str]
    records: list[Record]
    prompts: dict[tuple[int | str, int], list[int]] = field(default_factory=dict)
    baseline: str = BASELINE
    run_orders: dict[int | str, list[str]] = field(default_factory=dict)

    def outputs(self, method: str) -> dict[tuple[int | str, int], MethodOutput]:
        return {(r.question_id, r.turn): r.output for r in self.records if r.method == method}


def count_generations(questions: Sequence[Question], n_methods: int, warmup: bool = True) -> int:
    """How many generations a run makes (for a progress bar's total)."""
    return n_methods * (sum(len(q.turns) for q in questions) + (1 if warmup else 0))


def run_orders(
    question_ids: Sequence[int | str], methods: Sequence[str], seed: int | None
) -> dict[int | str, list[str]]:
    """A run order per question: ``methods`` shuffled by one generator seeded with ``seed`` (None: 0), drawn
    question by question, so the orders depend only on the seed, the method list and the question count."""
    rng = random.Random(0 if seed is None else seed)
    return {qid: rng.sample(list(methods), len(methods)) for qid in question_ids}


def run_loop(
    questions: Sequence[Question],
    runners: Sequence[MethodRunner],
    conversation: Conversation,
    *,
    max_new_tokens: int,
    params: SamplingParams,
    warmup_tokens: int | None = None,
    on_generation: Callable[[str, str], None] | None = None,
) -> BenchRun:
    """Run every method on every question and turn, interleaved in a shuffled order per question (seeded with
    ``params.seed``); see the module docstring for the rules.

    ``on_generation(method, label)`` is called after each generation (warm-ups included), e.g. to advance a
    progress bar. ``warmup_tokens`` (default: ``max_new_tokens``) bounds the warm-up generation.
    """
    check_max_new_tokens(max_new_tokens, "--max-new-tokens")
    names = [r.name for r in runners]
    if BASELINE not in names:
        raise InvalidRequestError(f"the benchmark needs the baseline method {BASELINE!r} among its methods")
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"method names must be unique, got {names}")
    # Listed (and warmed up) baseline first; the timed runs follow each question's run order.
    ordered = sorted(runners, key=lambda r: r.name != BASELINE)
    by_name = {r.name: r for r in ordered}
    notify = on_generation or (lambda method, label: None)

    warmup_ids = conversation.encode([{"role": "user", "content": WARMUP_PROMPT}])
    for runner in ordered:
        runner.run(warmup_ids, warmup_tokens or max_new_tokens, params)
        notify(runner.name, "warm-up")

    run = BenchRun(methods=[r.name for r in ordered], records=[])
    run.run_orders = run_orders([q.question_id for q in questions], run.methods, params.seed)
    for question in questions:
        question_runners = [by_name[name] for name in run.run_orders[question.question_id]]
        messages: Messages = []
        for turn, text in enumerate(question.turns):
            messages.append({"role": "user", "content": text})
            prompt_ids = conversation.encode(messages)
            run.prompts[(question.question_id, turn)] = prompt_ids
            baseline_answer: list[int] | None = None
            for runner in question_runners:
                output = runner.run(prompt_ids, max_new_tokens, params)
                run.records.append(
                    Record(runner.name, question.question_id, question.category, question.group, turn, output)
                )
                if runner.name == BASELINE:
                    baseline_answer = output.token_ids
                notify(runner.name, f"{question.question_id} turn {turn + 1}")
            assert baseline_answer is not None
            messages.append({"role": "assistant", "content": conversation.decode(baseline_answer)})
    return run
