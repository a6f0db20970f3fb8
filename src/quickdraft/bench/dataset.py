"""Benchmark questions: the Spec-Bench reader, task groups, and the built-in prompt set.

A Spec-Bench file has one JSON object per line with ``question_id``, ``category`` and ``turns`` (a list of
user turns). As in Spec-Bench, MT-Bench's eight categories form one task group, "multi-turn"; every other
category is its own group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from quickdraft.errors import InvalidRequestError

MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)
MULTI_TURN = "multi-turn"
REQUIRED_KEYS = ("question_id", "category", "turns")


@dataclass(frozen=True)
class Question:
    """One benchmark question: its id, its dataset category, its task group, and its user turns."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]

    @property
    def group(self) -> str:
        return group_of(self.category)


def group_of(category: str) -> str:
    """The task group a category is reported under (MT-Bench's categories all count as "multi-turn")."""
    return MULTI_TURN if category in MT_BENCH_CATEGORIES else category


def parse_question(obj: object, where: str) -> Question:
    """A :class:`Question` from one decoded row; ``where`` (e.g. ``"file.jsonl line 3"``) prefixes errors."""
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise InvalidRequestError(
            f"{where}: missing key(s) {', '.join(missing)}; every row needs {', '.join(REQUIRED_KEYS)}"
        )
    qid, category, turns = obj["question_id"], obj["category"], obj["turns"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise InvalidRequestError(f"{where}: question_id must be an integer or a string, got {qid!r}")
    if not isinstance(category, str) or not category:
        raise InvalidRequestError(f"{where}: category must be a non-empty string, got {category!r}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise InvalidRequestError(f"{where}: turns must be a non-empty list of non-empty strings")
    return Question(qid, category, tuple(turns))


def read_questions(path: str | Path) -> list[Question]:
    """All questions of a Spec-Bench-format JSONL file, in file order (blank lines are skipped)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidRequestError(f"dataset file {str(path)!r} does not exist; pass a Spec-Bench question.jsonl")
    if not path.is_file():
        raise InvalidRequestError(f"dataset path {str(path)!r} is not a file; pass a Spec-Bench question.jsonl")
    questions: list[Question] = []
    seen: dict[tuple[str, str], int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidRequestError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            question = parse_question(obj, where)
            key = (type(question.question_id).__name__, str(question.question_id))
            if key in seen:
                raise InvalidRequestError(
                    f"{where}: question_id {question.question_id!r} already used on line {seen[key]}"
                )
            seen[key] = number
            questions.append(question)
    if not questions:
        raise InvalidRequestError(f"dataset file {str(path)!r} holds no questions")
    return questions


def builtin_questions() -> list[Question]:
    """quickdraft's own prompt set (see :mod:`quickdraft.bench.prompts`)."""
    from quickdraft.bench.prompts import BUILTIN_QUESTIONS

    return [parse_question(row, f"built-in prompt {i}") for i, row in enumerate(BUILTIN_QUESTIONS)]


def select_per_group(questions: list[Question], per_group: int | None) -> list[Question]:
    """The first ``per_group`` questions of each task group, in their original order (None: all)."""
    if per_group is None:
        return list(questions)
    if per_group < 1:
        raise InvalidRequestError(f"--per-category must be >= 1, got {per_group}")
    counts: dict[str, int] = {}
    chosen = []
    for question in questions:
        if counts.get(question.group, 0) < per_group:
            counts[question.group] = counts.get(question.group, 0) + 1
            chosen.append(question)
    return chosen


def load_questions(dataset: str | Path | None, per_group: int | None = None) -> list[Question]:
    """Questions from ``dataset`` (None: the built-in set), the first ``per_group`` of each task group."""
    questions = builtin_questions() if dataset is None else read_questions(dataset)
    return select_per_group(questions, per_group)


def groups_in_order(questions: list[Question]) -> list[str]:
    """Task groups in order of first appearance."""
    return list(dict.fromkeys(q.group for q in questions))
