"""quickdraft agreement: identical greedy answers and teacher-forced top-1 agreement against a reference."""

from __future__ import annotations

import json

import pytest

from quickdraft.bench.agreement import greedy_answers, measure_agreement, teacher_forced_agreement
from quickdraft.bench.dataset import Question
from quickdraft.cli import main
from quickdraft.engine import Engine
from quickdraft.models.loading import LoadedModel
from quickdraft.models.native import NativeCausalLM

from conftest import CharTokenizer, perturbed_copy, tiny_engine, tiny_hf_model

QUESTIONS = [Question(i, "writing", [text]) for i, text in enumerate(["ABCABCABD", "HELLOWORLD", "QRSTQRST"])]


def engine_of(hf_model) -> Engine:
    return Engine(LoadedModel("tiny", CharTokenizer(), hf_model, NativeCausalLM(hf_model)))


def test_a_model_agrees_with_itself_everywhere():
    engine = tiny_engine()
    prompt = [1, 2, 3, 1, 2]
    [answer] = greedy_answers(engine, [prompt], max_new_tokens=12)
    assert teacher_forced_agreement(engine, prompt, answer) == len(answer)
    # the reference's token replaced by another: at least that position disagrees
    assert len(answer) >= 2
    changed = [answer[0], (answer[1] + 1) % 30, *answer[2:]]
    assert teacher_forced_agreement(engine, prompt, changed) <= len(answer) - 1


def test_modes_are_judged_against_the_reference_answers():
    reference = tiny_hf_model("llama")
    candidates = {"dense": reference, "int8": perturbed_copy(reference), "int4": tiny_hf_model("llama", 7)}
    loaded = []

    def load(weights: str, dtype: str) -> Engine:
        loaded.append(weights)
        return engine_of(candidates[weights])

    same, close, other = measure_agreement(load, [("dense", "float32"), ("int8", "float32"), ("int4", "float32")],
                                           QUESTIONS, max_new_tokens=16)
    assert loaded == ["dense", "dense", "int8", "int4"]  # the reference first, one model at a time
    assert (same.identical, same.answers, same.top1_agreement) == (3, 3, 1.0)
    assert same.positions == close.positions == other.positions > 0
    assert other.top1_agreement < close.top1_agreement <= 1.0  # another model agrees far less
    assert other.identical <= close.identical


def test_the_command_refuses_an_unknown_weights_mode(capsys):
    assert main(["agreement", "--weights", "int3", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "--weights takes" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_command_writes_its_table_and_json(tmp_path, capsys):
    out = tmp_path / "agreement.json"
    assert main(["agreement", "--weights", "int8", "--per-category", "1", "--max-new-tokens", "8",
                 "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    [row] = saved["results"]
    assert row["weights"] == "int8" and row["answers"] == saved["questions"] > 0
    assert 0.5 < row["top1_agreement"] <= 1.0
