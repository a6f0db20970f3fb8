"""Per-row drafter state for vLLM-style proposers (no vLLM needed): rows are batch slots, not requests, so
each row's drafts must come from its own request's history only."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from quickdraft.bench.runners import check_methods, parse_method
from quickdraft.bench.vllm_peer import VllmPeerError, VllmWorker, parse_vllm_method
from quickdraft.drafters import DrafterSetup, create_drafter
from quickdraft.errors import InvalidRequestError
from quickdraft.integrations.rows import RowDrafters, accepted_prefix
from quickdraft.integrations.vllm import OPTIONS_ENV, Auto, Ngram, ProposerConfigError, Suffix, read_options
from quickdraft.types import DraftTree, SamplingParams

# Two requests over disjoint tokens: a draft from the wrong history is a token the row never held.
A = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
B = [11, 12, 13, 14, 11, 12, 13, 14, 11]
C = [21, 1, 2, 22, 23, 24, 25, 26, 27, 28, 29, 1, 2]  # longer than A; shares "1 2" with A, then other tokens


def occurs_in(draft: list[int], tokens: list[int]) -> bool:
    """Whether ``draft`` is a contiguous run of ``tokens`` (where a copying drafter takes its drafts from)."""
    n = len(draft)
    return any(tokens[i : i + n] == draft for i in range(len(tokens) - n + 1))


class Recorder:
    """Builds suffix drafters and remembers which were ended."""

    def __init__(self) -> None:
        self.made: list = []
        self.ended: list = []

    def __call__(self):
        drafter = create_drafter("suffix", DrafterSetup(None, None, {}))  # type: ignore[arg-type]
        end = drafter.end

        def recorded_end() -> None:
            self.ended.append(drafter)
            end()

        drafter.end = recorded_end  # type: ignore[method-assign]
        self.made.append(drafter)
        return drafter


def test_rows_draft_from_their_own_history() -> None:
    rows = RowDrafters(Recorder(), max_tokens=4)
    drafts = rows.propose([A, B])
    assert drafts == [[3, 4, 5, 1], [12, 13, 14, 11]]
    for draft, tokens in zip(drafts, [A, B]):
        assert occurs_in(draft, tokens)


def test_new_request_in_a_row_gets_a_fresh_drafter() -> None:
    recorder = Recorder()
    rows = RowDrafters(recorder, max_tokens=4)
    rows.propose([A, B])
    first = rows.states[0].drafter
    # Row 0 now holds request C: A's history ("1 2" -> "3 4 5") must not be proposed.
    drafts = rows.propose([C, B + [12]])
    assert rows.states[0].drafter is not first and first in recorder.ended
    assert drafts[0] == [22, 23, 24, 25]
    assert occurs_in(drafts[0], C) and occurs_in(drafts[1], B + [12])


def test_request_moved_to_another_row_keeps_its_drafter() -> None:
    recorder = Recorder()
    rows = RowDrafters(recorder, max_tokens=4)
    rows.propose([A, B])
    b_drafter = rows.states[1].drafter
    # A finished; the engine compacted its batch: B now sits in row 0 and row 1 is empty.
    drafts = rows.propose([B + [12, 13]])
    assert rows.states[0].drafter is b_drafter and list(rows.states) == [0]
    assert len(recorder.ended) == 1 and recorder.ended[0] is not b_drafter
    assert occurs_in(drafts[0], B + [12, 13])


def test_rows_without_a_step_keep_their_state_and_empty_rows_release_it() -> None:
    recorder = Recorder()
    rows = RowDrafters(recorder, max_tokens=4)
    rows.propose([A, B, C])
    kept = rows.states[1].drafter
    assert rows.propose([A + [3], None]) == [[4, 5, 1, 2], []]
    assert rows.states[1].drafter is kept and len(recorder.ended) == 1  # row 2 emptied: C released
    rows.release_all()
    assert len(recorder.ended) == 3


def test_chains_respect_k_and_row_limits() -> None:
    rows = RowDrafters(Recorder(), max_tokens=3)
    assert rows.propose([A, B], limits=[2, 0]) == [[3, 4], []]
    assert all(len(d) <= 3 for d in rows.propose([A + [3], B + [12]]))


def test_committed_tokens_are_observed_as_a_verification_step() -> None:
    observed = []
    drafter = create_drafter("ngram", DrafterSetup(None, None, {}))  # type: ignore[arg-type]
    drafter.observe = lambda ctx, outcome: observed.append(outcome)  # type: ignore[method-assign]
    rows = RowDrafters(lambda: drafter, max_tokens=4)
    assert rows.propose([A]) == [[3, 4, 5, 1]]
    rows.propose([A + [3, 4, 9]])  # accepted 3, 4; the target chose 9
    assert observed[0].result.tokens == [3, 4, 9] and observed[0].result.num_accepted == 2


def test_accepted_prefix_stops_before_the_bonus_token() -> None:
    chain = DraftTree.chain([5, 6, 7])
    assert accepted_prefix(chain, [5, 6, 7, 8]) == 3
    assert accepted_prefix(chain, [5, 9]) == 1
    assert accepted_prefix(chain, [5]) == 0


def vllm_config(k: int = 4, max_model_len: int = 64) -> SimpleNamespace:
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           model_config=SimpleNamespace(max_model_len=max_model_len))


def vllm_call(rows: list[list[int] | None], width: int = 64) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The arguments vLLM passes a proposer: sampled ids per row, token counts, a [rows + 2, width] id array."""
    ids = np.zeros((len(rows) + 2, width), dtype=np.int32)
    counts = np.zeros(len(rows) + 2, dtype=np.int32)
    for i, tokens in enumerate(rows):
        if tokens:
            ids[i, : len(tokens)] = tokens
            counts[i] = len(tokens)
    return [[t[-1]] if t else [] for t in rows], counts, ids


@pytest.mark.parametrize("proposer", [Ngram, Suffix, Auto])
def test_proposers_take_vllms_arguments(proposer: type) -> None:
    p = proposer(vllm_config(), options={})
    drafts = p.propose(*vllm_call([A, None, B]), slot_mappings=None)
    assert len(drafts) == 3 and drafts[1] == []
    assert occurs_in(drafts[0], A) and occurs_in(drafts[2], B) and drafts[0] and drafts[2]
    # Row 0's request was replaced by C; the new request's drafts come from C alone.
    drafts = p.propose(*vllm_call([C, None, B + [12]]))
    assert occurs_in(drafts[0], C)
    p.load_model(None)


def test_proposer_stops_at_the_model_length() -> None:
    p = Suffix(vllm_config(k=4, max_model_len=len(A) + 2), options={})
    assert p.propose(*vllm_call([A]))[0] == [3, 4]


@pytest.mark.parametrize(("proposer", "options", "message"), [
    (Ngram, {"bogus": 1}, "the ngram drafter has no option 'bogus'; its options are: max_ngram, min_ngram"),
    (Ngram, {"max_ngram": "x"}, "invalid option value for the ngram drafter"),
    (Suffix, {"max_depth": 0}, "max_depth must be an integer >= 1"),
    (Auto, {"sources": "suffix,recycle"}, "inside vLLM auto can use ngram and suffix"),
    (Auto, {"head": "eagle.safetensors"}, "its options inside vLLM are: datastore, smoothing, sources"),
])
def test_bad_options_fail_at_start_up_naming_valid_choices(proposer: type, options: dict, message: str) -> None:
    with pytest.raises(ProposerConfigError, match=message.replace("(", r"\(")):
        proposer(vllm_config(), options=options)


def test_options_come_from_the_environment() -> None:
    assert read_options({OPTIONS_ENV: '{"max_ngram": 4}'}) == {"max_ngram": 4}
    assert read_options({}) == {}
    with pytest.raises(ProposerConfigError, match="must be a JSON object"):
        read_options({OPTIONS_ENV: "max_ngram=4"})


def test_integration_does_not_import_vllm() -> None:
    code = "import sys, quickdraft.integrations.vllm, quickdraft.bench.vllm_peer; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_vllm_method_names() -> None:
    assert parse_method("vllm+suffix@8") == ("suffix", 8)
    assert parse_vllm_method("vllm-ngram").speculative_config()["method"] == "ngram"
    assert parse_vllm_method("vllm").speculative_config() is None
    assert parse_vllm_method("vllm+auto").speculative_config()["model"] == "quickdraft.integrations.vllm.Auto"
    with pytest.raises(InvalidRequestError, match="token-only drafters: ngram, suffix, auto"):
        parse_vllm_method("vllm+recycle")
    with pytest.raises(InvalidRequestError, match="only vllm\\+NAME takes @N"):
        parse_vllm_method("vllm@4")


def test_bench_refuses_vllm_methods_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICKDRAFT_VLLM_PYTHON", sys.executable)
    with pytest.raises(InvalidRequestError, match="greedy decoding only"):
        check_methods(["ar", "vllm"], params=SamplingParams(temperature=0.7))
    monkeypatch.setenv("QUICKDRAFT_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(InvalidRequestError, match="make setup-vllm"):
        check_methods(["ar", "vllm"])


def test_worker_reports_a_bad_proposer_option_before_loading_vllm() -> None:
    """The worker checks a quickdraft proposer's options before it imports vLLM, so any Python will do."""
    config = {"model": "unused", "drafter_options": {"bogus": 1},
              "speculative_config": {"method": "custom_class", "model": "quickdraft.integrations.vllm.Suffix",
                                     "num_speculative_tokens": 4}}
    worker = VllmWorker(config, python=sys.executable)  # type: ignore[arg-type]
    with pytest.raises(VllmPeerError, match="the suffix drafter has no option 'bogus'; its options are: "):
        worker.ready()
    worker.close()
    assert json.dumps(config)  # the config travels as JSON
