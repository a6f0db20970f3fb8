"""How closely quantized weights follow the exact reference: identical greedy answers and top-1 agreement.

Terms:

- *reference*: the model loaded with ``--weights dense --dtype float32``, the exact reference mode.
- *identical answer*: a question whose greedy answer (plain decoding, first turn, up to ``max_new_tokens``
  tokens, cut at end of sequence) has the same token ids under a weights mode as under the reference.
- *top-1 agreement*: over every position of the reference's answers, the fraction at which the mode's most
  likely token, given the reference's own context (the prompt and the reference's answer so far: teacher
  forcing, one token per forward as plain decoding runs), is the reference's token. One early difference
  makes an answer non-identical from there on; top-1 agreement still judges every later position.

Speculation under a weights mode reproduces that mode's plain decoding (the greedy identity tests); this
module measures the other distance, from the mode's plain decoding to the reference's.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quickdraft.bench.dataset import Question
from quickdraft.bench.harness import EngineConversation
from quickdraft.bench.run import weights_mode
from quickdraft.bench.runners import EngineRunner, engine_target
from quickdraft.devices import dtype_name
from quickdraft.types import SamplingParams

REFERENCE = {"weights": "dense", "dtype": "float32"}


@dataclass
class ModeAgreement:
    """One weights mode against the reference: ``identical`` of ``answers`` answers, and ``agreeing`` of
    ``positions`` teacher-forced positions."""

    weights: str
    dtype: str
    identical: int
    answers: int
    agreeing: int
    positions: int

    @property
    def top1_agreement(self) -> float:
        return self.agreeing / self.positions if self.positions else 1.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "top1_agreement": self.top1_agreement}


def first_turn_prompts(engine: Any, questions: Sequence[Question]) -> list[list[int]]:
    """Each question's first turn as prompt ids, through the model's chat template (as the benchmark asks it)."""
    conversation = EngineConversation(engine)
    return [conversation.encode([{"role": "user", "content": q.turns[0]}]) for q in questions]


def greedy_answers(engine: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                   on_answer: Callable[[], None] = lambda: None) -> list[list[int]]:
    """Plain greedy decoding of each prompt, cut at end of sequence."""
    runner = EngineRunner("ar", engine)
    answers = []
    for prompt in prompts:
        answers.append(runner.run(prompt, max_new_tokens, SamplingParams()).token_ids)
        on_answer()
    return answers


@torch.inference_mode()
def teacher_forced_agreement(engine: Any, prompt: list[int], answer: list[int]) -> int:
    """Positions of ``answer`` at which ``engine``'s argmax, given ``prompt`` and ``answer``'s earlier tokens,
    is ``answer``'s token."""
    session = engine_target(engine).new_session(len(prompt) + len(answer) + 1)
    try:
        logits = session.prefill(prompt)
        agreeing = 0
        for token in answer:
            agreeing += int(logits.argmax().item() == token)
            logits = session.extend([token])
        return agreeing
    finally:
        session.close()


def measure_mode(engine: Any, weights: str, dtype: str, prompts: Sequence[list[int]],
                 reference: Sequence[list[int]], max_new_tokens: int,
                 on_answer: Callable[[], None] = lambda: None) -> ModeAgreement:
    """``engine`` (loaded in ``weights`` and ``dtype``) against the reference's ``reference`` answers."""
    answers = greedy_answers(engine, prompts, max_new_tokens, on_answer)
    identical = sum(mine == theirs for mine, theirs in zip(answers, reference))
    agreeing = 0
    for prompt, answer in zip(prompts, reference):
        agreeing += teacher_forced_agreement(engine, prompt, answer)
        on_answer()
    return ModeAgreement(weights, dtype, identical, len(reference), agreeing, sum(len(a) for a in reference))


def measure_agreement(load: Callable[[str, str], Any], modes: Sequence[tuple[str, str]],
                      questions: Sequence[Question], max_new_tokens: int,
                      on_answer: Callable[[], None] = lambda: None) -> list[ModeAgreement]:
    """Each ``(weights, dtype)`` of ``modes`` against the reference. ``load(weights, dtype)`` returns an
    engine without a drafter; one model is loaded at a time."""
    engine = load(REFERENCE["weights"], REFERENCE["dtype"])
    prompts = first_turn_prompts(engine, questions)
    reference = greedy_answers(engine, prompts, max_new_tokens, on_answer)
    results = []
    for weights, dtype in modes:
        del engine
        gc.collect()
        engine = load(weights, dtype)
        resolved = weights_mode(engine) or weights  # what auto chose
        results.append(measure_mode(engine, resolved, dtype_name(engine.dtype), prompts, reference, max_new_tokens,
                                    on_answer))
    return results
