"""Fast tests of the benchmark package: no real model, scripted runners only."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from quickdraft.bench import profile as prof
from quickdraft.bench.cli import (
    add_bench_arguments,
    add_profile_arguments,
    bench_main,
    parse_drafter_options,
    profile_main,
)
from quickdraft.bench.dataset import (
    MULTI_TURN,
    Question,
    builtin_questions,
    group_of,
    groups_in_order,
    load_questions,
    read_questions,
    select_per_group,
)
from quickdraft.bench.divergence import compare_to_baseline, first_divergence
from quickdraft.bench.harness import BenchRun, Record, count_generations, run_loop, run_orders
from quickdraft.bench.metrics import Totals, aggregate
from quickdraft.bench.report import BenchReport, plot_speedups, render_table, source_revision
from quickdraft.bench.run import run_bench
from quickdraft.bench.runners import (
    HFRunner,
    MethodOutput,
    build_runners,
    check_methods,
    cut_at_eos,
    import_llama,
    parse_method,
    split_methods,
)
from quickdraft.bench.top2 import Top2, Top2Recorder
from quickdraft.errors import InvalidRequestError
from quickdraft.models.base import ForwardOutput
from quickdraft.types import DraftTree, SamplingParams

SPECBENCH = Path(__file__).resolve().parents[2] / "shared" / "specbench" / "question.jsonl"


# ---------------------------------------------------------------- fakes


class WordConversation:
    """Encodes chat messages word by word into small ids; decodes ids as 'w<id>' words."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.encoded: list[list[dict]] = []

    def encode(self, messages):
        self.encoded.append([dict(m) for m in messages])
        ids = []
        for message in messages:
            ids.append(1000 if message["role"] == "user" else 1001)
            for word in message["content"].split():
                ids.append(self.vocab.setdefault(word, len(self.vocab) + 10))
        return ids

    def decode(self, token_ids):
        return " ".join(f"w{t}" for t in token_ids)


class ScriptedRunner:
    """Answers with ``tokens(prompt_ids)``; takes ``seconds_per_token`` per token; ``forwards`` per answer."""

    def __init__(self, name, tokens, seconds_per_token=0.01, tau=None, log=None):
        self.name = name
        self.tokens = tokens
        self.seconds_per_token = seconds_per_token
        self.tau = tau
        self.log = log if log is not None else []

    def run(self, prompt_ids, max_new_tokens, params):
        self.log.append((self.name, list(prompt_ids)))
        out = list(self.tokens(prompt_ids))[:max_new_tokens]
        forwards = None
        if self.tau is not None:
            forwards = max(1, round(len(out) / self.tau))
        return MethodOutput(out, len(out) * self.seconds_per_token, forwards, len(out) if forwards else None,
                            0 if self.tau == 1 else (2 * forwards if forwards else None))


def echo(prompt_ids):
    """A deterministic 'model': the answer depends only on the prompt."""
    return [(t * 7 + i) % 97 for i, t in enumerate(prompt_ids[-6:])] + [5, 6]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(qid, category, turns):
    return json.dumps({"question_id": qid, "category": category, "turns": turns})


# ---------------------------------------------------------------- dataset


def test_group_of_folds_mt_bench_categories():
    for category in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"):
        assert group_of(category) == MULTI_TURN
    assert group_of("math_reasoning") == "math_reasoning"
    assert group_of("translation") == "translation"


def test_read_questions_and_per_group_selection(tmp_path):
    path = write_lines(
        tmp_path / "q.jsonl",
        [
            row(1, "writing", ["a", "b"]),
            row(2, "coding", ["c", "d"]),
            "",
            row(3, "qa", ["e"]),
            row(4, "roleplay", ["f", "g"]),
            row(5, "qa", ["h"]),
            row("x6", "qa", ["i"]),
        ],
    )
    questions = read_questions(path)
    assert [q.question_id for q in questions] == [1, 2, 3, 4, 5, "x6"]
    assert questions[0].turns == ("a", "b")
    assert groups_in_order(questions) == [MULTI_TURN, "qa"]
    chosen = select_per_group(questions, 2)
    # MT-Bench categories share one group: writing + coding are the first two multi-turn questions.
    assert [q.question_id for q in chosen] == [1, 2, 3, 5]
    assert select_per_group(questions, None) == questions
    assert [q.question_id for q in load_questions(path, 1)] == [1, 3]


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([row(1, "qa", ["a"]), "{not json", row(3, "qa", ["c"])], "line 2"),
        ([row(1, "qa", ["a"]), "", json.dumps({"question_id": 2, "turns": ["x"]})], "line 3"),
        ([json.dumps({"question_id": 2, "turns": ["x"]})], "category"),
        ([json.dumps({"category": "qa", "turns": ["x"]})], "question_id"),
        ([json.dumps({"question_id": 1, "category": "qa"})], "turns"),
        ([row(1, "qa", [])], "turns must be a non-empty list"),
        ([row(1, "qa", "just a string")], "turns must be a non-empty list"),
        ([row(1, "qa", ["a"]), row(1, "qa", ["b"])], "already used on line 1"),
        (["[1, 2, 3]"], "expected a JSON object"),
        ([row(True, "qa", ["a"])], "question_id"),
    ],
)
def test_malformed_rows_raise_with_line_number(tmp_path, lines, needle):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InvalidRequestError) as info:
        read_questions(path)
    assert needle in str(info.value)
    assert "bad.jsonl" in str(info.value)


def test_missing_keys_message_names_the_line_and_keys(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [row(1, "qa", ["a"]), json.dumps({"question_id": 2})])
    with pytest.raises(InvalidRequestError, match=r"line 2: missing key\(s\) category, turns"):
        read_questions(path)


def test_unknown_file_and_directory_and_empty_file(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        read_questions(tmp_path / "nope.jsonl")
    with pytest.raises(InvalidRequestError, match="not a file"):
        read_questions(tmp_path)
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(InvalidRequestError, match="no questions"):
        read_questions(empty)
    with pytest.raises(InvalidRequestError, match="--per-category"):
        load_questions(None, 0)


def test_builtin_set_covers_the_six_groups():
    questions = builtin_questions()
    groups = groups_in_order(questions)
    assert groups == [MULTI_TURN, "translation", "summarization", "qa", "math_reasoning", "rag"]
    for group in groups:
        members = [q for q in questions if q.group == group]
        assert len(members) >= 2
        assert all(len(q.turns) == (2 if group == MULTI_TURN else 1) for q in members)
    assert len(load_questions(None, 1)) == 6
    assert len({q.question_id for q in questions}) == len(questions)


@pytest.mark.skipif(not SPECBENCH.is_file(), reason="Spec-Bench questions not available")
def test_specbench_file_reads_into_six_groups():
    questions = read_questions(SPECBENCH)
    assert len(questions) == 480
    chosen = select_per_group(questions, 2)
    assert len(chosen) == 12
    assert groups_in_order(chosen) == [MULTI_TURN, "translation", "summarization", "qa", "math_reasoning", "rag"]


# ---------------------------------------------------------------- harness


def test_loop_warms_up_then_interleaves_per_question():
    log: list = []
    runners = [
        ScriptedRunner("ngram", echo, log=log, tau=2.0),
        ScriptedRunner("ar", echo, log=log, tau=1.0),
        ScriptedRunner("hf", echo, log=log),
    ]
    questions = [Question(1, "qa", ("hello world",)), Question(2, "translation", ("guten tag",))]
    conversation = WordConversation()
    seen = []
    run = run_loop(questions, runners, conversation, max_new_tokens=8, params=SamplingParams(),
                   on_generation=lambda m, label: seen.append((m, label)))
    names = [name for name, _ in log]
    assert names[:3] == ["ar", "ngram", "hf"]  # warm-up, once each, before anything timed
    assert names[3:] == run.run_orders[1] + run.run_orders[2]  # interleaved per question, in its run order
    assert all(sorted(order) == ["ar", "hf", "ngram"] for order in run.run_orders.values())
    assert [label for _, label in seen[:3]] == ["warm-up"] * 3
    assert run.methods == ["ar", "ngram", "hf"]
    assert len(run.records) == 6  # warm-ups are not recorded
    assert len(seen) == count_generations(questions, 3) == 9
    # Every method got the same prompt ids for the same question; the records follow the run order.
    assert [r.method for r in run.records] == names[3:]
    prompts = [ids for _, ids in log[3:6]]
    assert prompts[0] == prompts[1] == prompts[2] == run.prompts[(1, 0)]


def test_multi_turn_feeds_back_the_baseline_answer():
    log: list = []

    def other(prompt_ids):
        return [42, 43, 44]

    runners = [ScriptedRunner("ar", echo, log=log, tau=1.0), ScriptedRunner("hf", other, log=log)]
    conversation = WordConversation()
    question = Question("mt", "writing", ("first turn", "second turn"))
    run = run_loop([question], runners, conversation, max_new_tokens=16, params=SamplingParams())
    ar_turn1 = run.outputs("ar")[("mt", 0)].token_ids
    last = conversation.encoded[-1]
    assert last == [
        {"role": "user", "content": "first turn"},
        {"role": "assistant", "content": conversation.decode(ar_turn1)},
        {"role": "user", "content": "second turn"},
    ]
    turn2 = [ids for name, ids in log if ids == run.prompts[("mt", 1)]]
    assert len(turn2) == 2  # ar and hf both answered turn 2 from the same conversation
    assert {r.turn for r in run.records} == {0, 1}
    assert all(r.group == MULTI_TURN for r in run.records)


def test_method_order_is_shuffled_per_question_reproducibly_from_the_seed_and_reported():
    questions = [Question(i, "qa", (f"question {i}",)) for i in range(8)]
    methods = ["ar", "ngram", "suffix", "hf"]

    def bench(seed):
        log: list = []
        runners = [ScriptedRunner(name, echo, log=log, tau=1.0) for name in methods]
        report = run_bench(None, questions, runners=runners, conversation=WordConversation(), max_new_tokens=4,
                           params=SamplingParams(seed=seed))
        return report, [name for name, _ in log]

    report, ran = bench(seed=3)
    orders = report.run.run_orders
    assert ran[:len(methods)] == methods  # one untimed warm-up each, first
    assert ran[len(methods):] == [name for q in questions for name in orders[q.question_id]]  # as recorded
    assert all(sorted(order) == sorted(methods) for order in orders.values())
    assert len({tuple(order) for order in orders.values()}) > 1  # the order differs between questions
    assert {order[0] for order in orders.values()} != {"ar"}  # ar is not always first
    assert bench(seed=3)[0].run.run_orders == orders  # reproducible for a seed
    assert bench(seed=4)[0].run.run_orders != orders
    assert run_orders([q.question_id for q in questions], methods, 3) == orders
    assert report.to_json()["run_order"] == [{"question_id": q.question_id, "methods": orders[q.question_id]}
                                             for q in questions]
    assert report.to_json()["methods"]["ar"]["speedup"] == pytest.approx(1.0)  # against ar of the same run
    assert report.to_json()["methods"]["hf"]["total"] == len(questions)


def test_loop_requires_the_baseline_and_unique_names():
    conversation = WordConversation()
    q = [Question(1, "qa", ("x",))]
    with pytest.raises(InvalidRequestError, match="baseline"):
        run_loop(q, [ScriptedRunner("hf", echo)], conversation, max_new_tokens=4, params=SamplingParams())
    with pytest.raises(InvalidRequestError, match="unique"):
        run_loop(q, [ScriptedRunner("ar", echo), ScriptedRunner("ar", echo)], conversation, max_new_tokens=4,
                 params=SamplingParams())
    with pytest.raises(InvalidRequestError, match="max-new-tokens"):
        run_loop(q, [ScriptedRunner("ar", echo)], conversation, max_new_tokens=0, params=SamplingParams())


def test_split_methods_puts_ar_first_and_rejects_duplicates():
    assert split_methods("hf,ngram") == ["ar", "hf", "ngram"]
    assert split_methods("ngram, ar ,hf") == ["ar", "ngram", "hf"]
    with pytest.raises(InvalidRequestError, match="more than once"):
        split_methods("ar,hf,hf")
    with pytest.raises(InvalidRequestError, match="empty"):
        split_methods(" , ")
    with pytest.raises(InvalidRequestError, match="'ar'"):
        split_methods("none,hf")


# ---------------------------------------------------------------- metrics


def _record(method, qid, group, tokens, seconds, forwards=None, committed=None, drafted=None, turn=0):
    return Record(method, qid, group, group, turn,
                  MethodOutput(list(range(tokens)), seconds, forwards, committed, drafted))


def scripted_run() -> BenchRun:
    """Two groups, two questions each; hand-computed expectations below."""
    records = [
        # ar: 1 token per forward.
        _record("ar", 1, "qa", 10, 1.0, 10, 10, 0),
        _record("ar", 2, "qa", 30, 2.0, 30, 30, 0),
        _record("ar", 3, "rag", 20, 1.0, 20, 20, 0),
        _record("ar", 4, "rag", 20, 1.0, 20, 20, 0),
        # spec: fewer forwards, faster.
        _record("spec", 1, "qa", 10, 0.5, 4, 10, 9),
        _record("spec", 2, "qa", 30, 0.5, 10, 30, 27),
        _record("spec", 3, "rag", 20, 1.0, 10, 20, 18),
        _record("spec", 4, "rag", 20, 0.25, 5, 20, 8),
        # peer: no forwards known.
        _record("hf", 1, "qa", 10, 2.0),
        _record("hf", 2, "qa", 30, 2.0),
        _record("hf", 3, "rag", 20, 1.0),
        _record("hf", 4, "rag", 20, 1.0),
    ]
    prompts = {(q, 0): [q] for q in (1, 2, 3, 4)}
    return BenchRun(methods=["ar", "spec", "hf"], records=records, prompts=prompts)


def test_aggregate_is_ratio_of_sums():
    metrics = aggregate(scripted_run())
    ar, spec, hf = metrics["ar"], metrics["spec"], metrics["hf"]
    assert ar.overall.tokens_per_s == pytest.approx(80 / 5.0)
    assert spec.overall.tokens_per_s == pytest.approx(80 / 2.25)
    # Not the mean of per-question rates (10/0.5, 30/0.5, 20/1, 20/0.25 -> 45).
    assert spec.overall.tokens_per_s != pytest.approx((20 + 60 + 20 + 80) / 4)
    assert ar.speedup == pytest.approx(1.0)
    assert spec.speedup == pytest.approx((80 / 2.25) / 16.0)
    assert hf.speedup == pytest.approx((80 / 6.0) / 16.0)
    # tau = committed / forwards, aggregated.
    assert ar.overall.tau == pytest.approx(1.0)
    assert spec.overall.tau == pytest.approx(80 / 29)
    assert hf.overall.tau is None
    # per group
    assert spec.per_group["qa"].tokens_per_s == pytest.approx(40 / 1.0)
    assert spec.group_speedup["qa"] == pytest.approx(40.0 / (40 / 3.0))
    assert spec.per_group["rag"].tau == pytest.approx(40 / 15)
    assert spec.group_speedup["rag"] == pytest.approx((40 / 1.25) / 20.0)
    assert hf.per_group["rag"].tau is None
    assert list(metrics) == ["ar", "spec", "hf"]


def test_nodes_per_step_and_draft_fraction():
    # 4 generations, 29 forwards -> 25 verification steps; 62 draft nodes verified.
    totals = aggregate(scripted_run())["spec"].overall
    assert totals.verify_steps == 25
    assert totals.nodes_per_step == pytest.approx((62 + 25) / 25)
    assert aggregate(scripted_run())["ar"].overall.nodes_per_step == pytest.approx(1.0)
    assert totals.draft_seconds_fraction is None
    timed = Totals.of([MethodOutput([1, 2], 2.0, 2, 2, 1, 0.5), MethodOutput([3], 2.0, 1, 1, 0, 0.5)])
    assert timed.draft_seconds_fraction == pytest.approx(0.25)
    assert Totals.of([]).tokens_per_s == 0.0


def test_committed_tokens_default_to_new_tokens_when_forwards_known():
    totals = Totals.of([MethodOutput([1, 2, 3, 4], 1.0, target_forwards=2)])
    assert totals.tau == pytest.approx(2.0)


# ---------------------------------------------------------------- divergence


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None
    assert first_divergence([4], [5]) == 0


def test_divergence_report_positions_tokens_and_gaps():
    records = [
        _record("ar", 1, "qa", 0, 1.0, 1, 1, 0),
        _record("ar", 2, "qa", 0, 1.0, 1, 1, 0),
        _record("spec", 1, "qa", 0, 1.0, 1, 1, 0),
        _record("spec", 2, "qa", 0, 1.0, 1, 1, 0),
        _record("hf", 1, "qa", 0, 1.0),
        _record("hf", 2, "qa", 0, 1.0),
    ]
    outputs = {
        ("ar", 1): [5, 6, 7, 8],
        ("ar", 2): [9, 9, 9],
        ("spec", 1): [5, 6, 7, 8],
        ("spec", 2): [9, 9, 9, 3],  # ar stopped (EOS) at 3, spec went on
        ("hf", 1): [5, 6, 4, 8],  # differs at position 2
        ("hf", 2): [9],  # hf stopped at 1
    }
    for r in records:
        r.output.token_ids = outputs[(r.method, r.question_id)]
    run = BenchRun(["ar", "spec", "hf"], records, prompts={(1, 0): [100, 101], (2, 0): [200]})
    plain = compare_to_baseline(run)  # Without recorded top-2 logits the report still has positions.
    assert plain["hf"].divergences[0].top2_gap is None
    # ar's recordings: one per token it chose, and one more for the EOS that ended question 2.
    recorded = {1: [Top2(0.5 + i, 10 + i, 20 + i) for i in range(4)],
                2: [Top2(0.25 * i, 30 + i, 40 + i) for i in range(4)]}
    for r in records[:2]:
        r.output.top2 = recorded[r.question_id]

    result = compare_to_baseline(run)
    assert (result["ar"].identical, result["ar"].total) == (2, 2)
    assert (result["spec"].identical, result["spec"].total) == (1, 2)
    assert (result["hf"].identical, result["hf"].total) == (0, 2)
    (spec_div,) = result["spec"].divergences
    assert (spec_div.question_id, spec_div.position, spec_div.baseline_token, spec_div.method_token) == (2, 3, None, 3)
    assert (spec_div.top2_gap, spec_div.top1_token, spec_div.top2_token) == (0.75, 33, 43)  # ar's EOS decision
    hf1, hf2 = result["hf"].divergences
    assert (hf1.position, hf1.baseline_token, hf1.method_token) == (2, 7, 4)
    assert (hf1.top2_gap, hf1.top1_token, hf1.top2_token) == (2.5, 12, 22)
    assert (hf2.position, hf2.baseline_token, hf2.method_token) == (1, 9, None)
    assert hf2.top2_gap == 0.25


class DecodeSkewedTarget:
    """A tiny target whose one-row decode forwards (``verify``) return twice the logits it computes: the
    same argmax as a prefill, a different top-2 gap, like a decode step that rounds unlike a prefill
    (exaggerated). It counts prefills and keeps, per session, the logits each verify returned."""

    def __init__(self, target) -> None:
        self.target = target
        self.prefills = 0
        self.sessions: list[list[torch.Tensor]] = []

    def __getattr__(self, name):
        return getattr(self.target, name)

    def new_session(self, max_len):
        self.sessions.append([])
        return _SkewedSession(self.target.new_session(max_len), self)


class _SkewedSession:
    def __init__(self, session, owner: DecodeSkewedTarget) -> None:
        self.session = session
        self.owner = owner

    def __getattr__(self, name):
        return getattr(self.session, name)

    def prefill(self, prompt_ids):
        self.owner.prefills += 1
        return self.session.prefill(prompt_ids)

    def verify(self, root, tree, hidden_layers=()):
        out = self.session.verify(root, tree, hidden_layers)
        logits = out.logits * 2
        self.owner.sessions[-1].append(logits.clone())
        return ForwardOutput(logits, out.hidden)


def test_divergence_gap_is_the_one_ar_decoded_with_and_no_forward_is_added():
    from quickdraft.engine import Engine

    from conftest import tiny_loaded

    loaded = tiny_loaded()
    skewed = DecodeSkewedTarget(loaded.target)
    engine = Engine(replace(loaded, target=skewed))
    plain = Engine(loaded)  # the same tokens as ar on the skewed target (doubling keeps the argmax)

    def off_at_3(prompt_ids):
        tokens = plain.generate_ids(prompt_ids, 6).token_ids
        return tokens[:3] + [(tokens[3] + 1) % 90] + tokens[4:]

    runners = [*build_runners(engine, ["ar"]), ScriptedRunner("other", off_at_3)]
    report = run_bench(engine, [Question("q", "qa", ("ABCABD",))], runners=runners, max_new_tokens=6,
                       warmup_tokens=2)
    (divergence,) = report.comparisons["other"].divergences
    assert divergence.position == 3
    assert skewed.prefills == 2  # ar's warm-up and its answer: the report ran no forward of its own
    decoded = torch.topk(skewed.sessions[1][2][0], 2)  # ar answering (after its warm-up), token 3
    assert divergence.top2_gap == pytest.approx(float(decoded.values[0] - decoded.values[1]))
    assert (divergence.top1_token, divergence.top2_token) == tuple(decoded.indices.tolist())
    ar_tokens = report.run.outputs("ar")[("q", 0)].token_ids
    fresh = loaded.target.new_session(64).prefill(report.run.prompts[("q", 0)] + ar_tokens[:3])
    fresh_values = torch.topk(fresh, 2).values
    assert divergence.top2_gap != pytest.approx(float(fresh_values[0] - fresh_values[1]))  # what a prefill says


def test_top2_recorder_keeps_the_top2_of_each_forward_that_chooses_a_token():
    from conftest import tiny_loaded

    target = tiny_loaded().target
    recorder = Top2Recorder(target)
    assert recorder.vocab_size == target.vocab_size  # every other attribute is the target's
    session = recorder.new_session(32)
    first = session.prefill([1, 2, 3])
    out = session.verify(int(first.argmax()), DraftTree.empty())
    expected = [torch.topk(first, 2), torch.topk(out.logits[0], 2)]
    top2 = recorder.take()
    assert [(t.top1, t.top2) for t in top2] == [tuple(e.indices.tolist()) for e in expected]
    assert [t.gap for t in top2] == pytest.approx([float(e.values[0] - e.values[1]) for e in expected])
    assert recorder.take() == [] and recorder.seconds > 0
    recorder.reset()
    assert recorder.seconds == 0.0
    with pytest.raises(ValueError, match="plain decoding only"):
        session.verify(int(first.argmax()), DraftTree.chain([4]))


# ---------------------------------------------------------------- report


def _report() -> BenchReport:
    run = scripted_run()
    settings = {"model": "fake.gguf", "dtype": "bfloat16", "device": "cpu", "hardware": {"cpu": "x"},
                "max_new_tokens": 32, "temperature": 0.0}
    return BenchReport(run, aggregate(run), compare_to_baseline(run), settings)


def test_json_has_the_documented_keys(tmp_path):
    report = _report()
    path = tmp_path / "sub" / "out.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    for key in ("model", "dtype", "device", "hardware", "max_new_tokens", "temperature", "methods"):
        assert key in data
    assert set(data["methods"]) == {"ar", "spec", "hf"}
    for entry in data["methods"].values():
        for key in ("tokens_per_s", "speedup", "mean_accepted", "identical", "total", "per_category",
                    "nodes_per_step", "draft_seconds_fraction", "divergences"):
            assert key in entry
        assert set(entry["per_category"]) == {"qa", "rag"}
        for group in entry["per_category"].values():
            assert {"tokens_per_s", "speedup", "mean_accepted"} <= set(group)
    assert data["methods"]["ar"]["mean_accepted"] == 1.0
    assert data["methods"]["hf"]["mean_accepted"] is None
    assert data["methods"]["spec"]["speedup"] == pytest.approx((80 / 2.25) / 16.0)
    assert data["methods"]["hf"]["identical"] == 4 and data["methods"]["hf"]["total"] == 4


def test_table_and_plot(tmp_path):
    from rich.console import Console

    report = _report()
    console = Console(record=True, width=200)
    render_table(report, console)
    text = console.export_text()
    assert "spec" in text and "hf" in text and "4/4" in text
    hf_line = next(line for line in text.splitlines() if line.strip("│ ").startswith("hf"))
    assert " - " in hf_line  # unknown tau
    png = tmp_path / "out.png"
    plot_speedups(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_bench_with_fakes_end_to_end(tmp_path):
    questions = [Question("m1", "coding", ("write code", "now test it")), Question("q1", "qa", ("why?",))]

    def diverging(prompt_ids):
        tokens = echo(prompt_ids)
        return tokens[:3] + [99] + tokens[4:]

    runners = [
        ScriptedRunner("ar", echo, 0.02, tau=1.0),
        ScriptedRunner("spec", echo, 0.01, tau=2.0),
        ScriptedRunner("hf", diverging, 0.02),
    ]
    report = run_bench(None, questions, runners=runners, conversation=WordConversation(), max_new_tokens=6,
                       settings={"model": "fake"})
    data = report.to_json()
    assert data["max_new_tokens"] == 6 and data["temperature"] == 0.0 and data["model"] == "fake"
    assert data["methods"]["spec"]["speedup"] == pytest.approx(2.0)
    assert data["methods"]["spec"]["identical"] == 3 and data["methods"]["spec"]["total"] == 3
    assert data["methods"]["hf"]["identical"] == 0
    assert {d["position"] for d in data["methods"]["hf"]["divergences"]} == {3}
    assert set(data["methods"]["ar"]["per_category"]) == {MULTI_TURN, "qa"}
    with pytest.raises(InvalidRequestError):
        run_bench(None, questions, runners=runners)


# ---------------------------------------------------------------- runners


class FakeHFModel:
    device = torch.device("cpu")

    def __init__(self, continuation):
        self.continuation = continuation
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        return torch.cat([input_ids, torch.tensor([self.continuation])], dim=1)


class FakeTokenizer:
    eos_token_id = 2
    pad_token_id = None


def test_hf_runner_strips_eos_and_passes_library_options():
    model = FakeHFModel([7, 8, 2, 9])
    runner = HFRunner("hf-pld", model, FakeTokenizer(), prompt_lookup_num_tokens=10)
    out = runner.run([1, 3, 4], 4, SamplingParams())
    assert out.token_ids == [7, 8]
    assert out.target_forwards is None and out.seconds >= 0
    kwargs = model.calls[0]
    assert kwargs["prompt_lookup_num_tokens"] == 10
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 4
    assert kwargs["eos_token_id"] == [2] and kwargs["pad_token_id"] == 2
    runner.run([1], 4, SamplingParams(temperature=0.7, top_p=0.9, seed=3))
    sampled = model.calls[1]
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    assert sampled["top_k"] == 0  # disables transformers' default top-k of 50
    assert cut_at_eos([1, 2, 3], [3]) == [1, 2]


def test_llamacpp_missing_names_the_install_command():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidRequestError, match="pip install llama-cpp-python"):
            import_llama()
    else:  # pragma: no cover - only where the extra is installed
        assert import_llama() is not None


# ---------------------------------------------------------------- profile


def test_cost_curve_median_and_interpolation():
    times = {1: [0.010, 0.011, 0.5], 4: [0.012, 0.012, 0.013], 8: [0.03, 0.02, 0.02]}
    seen = {k: 0 for k in times}

    def fake(k):
        value = times[k][seen[k] % 3]
        seen[k] += 1
        return value

    curve = prof.measure_cost_curve(fake, [4, 8], repeats=3, warmup_rounds=0)
    assert [p.k for p in curve] == [1, 4, 8]
    assert curve[0].seconds == pytest.approx(0.011)
    assert curve[1].cost == pytest.approx(0.012 / 0.011)
    assert curve[2].cost == pytest.approx(0.02 / 0.011)
    points = [prof.CostPoint(1, 1.0, 1.0), prof.CostPoint(2, 1.0, 1.2), prof.CostPoint(4, 1.0, 2.0)]
    assert prof.interpolate_cost(points, 1) == 1.0
    assert prof.interpolate_cost(points, 1.5) == pytest.approx(1.1)
    assert prof.interpolate_cost(points, 3) == pytest.approx(1.6)
    assert prof.interpolate_cost(points, 6) == pytest.approx(2.8)  # slope 0.4 per k past 4
    assert prof.interpolate_cost(points, 0.5) == 1.0


def test_parse_ks():
    assert prof.parse_ks("2,4,4,8") == [1, 2, 4, 8]
    assert prof.parse_ks(None) == list(range(1, 65))
    with pytest.raises(InvalidRequestError):
        prof.parse_ks("1,x")
    with pytest.raises(InvalidRequestError):
        prof.parse_ks("0,2")


def test_efficiency_rows():
    curve = [prof.CostPoint(1, 1.0, 1.0), prof.CostPoint(4, 1.0, 1.2), prof.CostPoint(8, 1.0, 1.6)]
    full = prof.efficiency_row("spec", {"mean_accepted": 3.0, "speedup": 2.0, "nodes_per_step": 4,
                                        "draft_seconds_fraction": 0.2}, curve)
    # d = c(k) f / (1 - f) = 1.2 * 0.25 = 0.3; bound = 3 / 1.5 = 2.0
    assert full["draft_cost"] == pytest.approx(0.3)
    assert full["bound"] == pytest.approx(2.0)
    assert full["efficiency"] == pytest.approx(1.0)
    assert full["assumed"] == []
    missing = prof.efficiency_row("spec", {"mean_accepted": 4.0, "speedup": 2.0}, curve)
    assert missing["k"] == 4.0 and missing["bound"] == pytest.approx(4.0 / 1.2)
    assert len(missing["assumed"]) == 2
    peer = prof.efficiency_row("hf", {"mean_accepted": None, "speedup": 1.1}, curve)
    assert peer["bound"] is None and peer["efficiency"] is None


# ---------------------------------------------------------------- cli


def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_bench_arguments_and_clear_errors(tmp_path, capsys):
    args = _parse(add_bench_arguments, ["--dataset", str(tmp_path / "missing.jsonl"), "--per-category", "2",
                                        "--methods", "ar,hf", "--json", "o.json", "--plot", "o.png"])
    assert args.per_category == 2 and args.methods == "ar,hf" and args.temperature == 0.0
    assert bench_main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    bad = write_lines(tmp_path / "bad.jsonl", [row(1, "qa", ["a"]), "oops"])
    assert bench_main(_parse(add_bench_arguments, ["--dataset", str(bad)])) == 2
    assert "line 2" in capsys.readouterr().err
    assert bench_main(_parse(add_bench_arguments, ["--temperature", "-1"])) == 2
    assert "temperature" in capsys.readouterr().err
    # Option names are checked before the model loads (the model path given here does not exist).
    bogus = ["--methods", "ar,suffix", "--drafter-option", "suffix:bogus=1", "--model", str(tmp_path / "none")]
    assert bench_main(_parse(add_bench_arguments, bogus)) == 2
    assert "the suffix drafter has no option 'bogus'" in capsys.readouterr().err


def test_parse_drafter_options():
    methods = ["ar", "hf", "ngram", "suffix"]
    options = parse_drafter_options(["ngram:n=3", "k=4", "ngram:name=abc"], methods)
    assert options == {"ngram": {"n": 3, "k": 4, "name": "abc"}, "suffix": {"k": 4}}
    with pytest.raises(InvalidRequestError):
        parse_drafter_options(["hf:n=3"], methods)
    with pytest.raises(InvalidRequestError):
        parse_drafter_options(["novalue"], methods)


def test_bench_datastore_goes_to_the_drafters_that_take_one():
    options = parse_drafter_options(["ngram:max_ngram=2"], ["ar", "ngram", "suffix", "auto@8"], "store.npz")
    assert options == {"ngram": {"max_ngram": 2}, "suffix": {"datastore": "store.npz"},
                       "auto@8": {"datastore": "store.npz"}}
    with pytest.raises(InvalidRequestError, match="add one of them to --methods"):
        parse_drafter_options([], ["ar", "ngram"], "store.npz")


def test_profile_from_saved_curve_with_bench_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    curve = {"model": "m", "dtype": "bfloat16", "device": "cpu", "backend": "fake",
             "curve": [{"k": 1, "seconds": 0.01, "cost": 1.0}, {"k": 8, "seconds": 0.012, "cost": 1.2}]}
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    report = _report()
    report.write_json(tmp_path / "bench.json")
    args = _parse(add_profile_arguments, ["--curve", str(tmp_path / "curve.json"),
                                          "--bench-json", str(tmp_path / "bench.json")])
    assert profile_main(args) == 0
    out = capsys.readouterr().out
    assert "efficiency" in out and "spec" in out and "tau unknown" in out
    args = _parse(add_profile_arguments, ["--curve", str(tmp_path / "curve.json"), "--bench-json",
                                          str(tmp_path / "nope.json")])
    assert profile_main(args) == 2


def test_profile_measures_a_curve_on_the_loaded_model_and_writes_it(tmp_path, capsys, monkeypatch):
    from quickdraft.engine import Engine

    from conftest import tiny_engine

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(Engine, "from_pretrained", staticmethod(lambda *args, **kwargs: tiny_engine()))
    args = _parse(add_profile_arguments, ["--ks", "1,2,4", "--repeats", "2", "--context", "16",
                                          "--json", str(tmp_path / "curve.json")])
    assert profile_main(args) == 0
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert [point["k"] for point in saved["curve"]] == [1, 2, 4]
    assert saved["curve"][0]["cost"] == 1.0 and all(point["seconds"] > 0 for point in saved["curve"])
    assert saved["context"] == 16 and saved["repeats"] == 2 and saved["backend"]
    out = capsys.readouterr().out
    assert "verification cost" in out and "context 16 tokens" in out and "wrote" in out
    reread = _parse(add_profile_arguments, ["--curve", str(tmp_path / "curve.json")])
    assert profile_main(reread) == 0



def test_source_revision_names_the_installed_version_and_the_checkout_commit():
    import re

    revision = source_revision()
    assert isinstance(revision["version"], str) and revision["version"]
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", revision["commit"])


def test_a_drafter_method_may_fix_its_draft_budget_with_at_n():
    from conftest import tiny_engine

    assert parse_method("suffix") == ("suffix", None)
    assert parse_method("suffix@8") == ("suffix", 8)
    check_methods(split_methods("suffix,suffix@4,ngram@16"))
    for bad, fragment in [("suffix@0", "integer >= 1"), ("suffix@x", "integer >= 1"), ("suffix@", "integer >= 1"),
                          ("ar@4", "only a drafter"), ("hf@2", "only a drafter"), ("nope@4", "unknown method")]:
        with pytest.raises(InvalidRequestError, match=fragment):
            check_methods(split_methods(bad))
    runners = build_runners(tiny_engine(), ["ar", "suffix", "suffix@3"], drafter_options={"suffix@3": {"max_depth": 2}})
    budgets = {runner.name: runner.engine.draft_budget for runner in runners}
    assert budgets == {"ar": None, "suffix": None, "suffix@3": 3}
    fixed = runners[2].engine
    assert fixed.drafter.max_depth == 2
    prompt = fixed.encode_prompt("abcabcabcabc")
    stats = fixed.generate_ids(prompt, 12).stats
    assert 0 < stats.drafted_tokens <= 3 * stats.target_forwards


def test_bench_options_scoped_to_a_fixed_budget_method_are_checked_against_its_drafter(capsys):
    options = parse_drafter_options(["suffix@4:max_depth=3"], ["ar", "suffix@4"])
    assert options == {"suffix@4": {"max_depth": 3}}
    args = _parse(add_bench_arguments, ["--methods", "suffix@4", "--drafter-option", "suffix@4:bogus=1"])
    assert bench_main(args) == 2
    assert "the suffix drafter has no option 'bogus'" in capsys.readouterr().err
