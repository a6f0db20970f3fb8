"""quickdraft's proposers inside real vLLM (group ``vllm``, also ``slow``): run with the vLLM environment's
Python (``make setup-vllm`` creates ``.venv-vllm``; CI does), through ``tests/vllm_probe.py``.

- greedy output with each quickdraft proposer equals vLLM's plain output, on a batch of real prompts;
- in one batch, every row's drafts come from its own request's history (recorded inside vLLM);
- a bad proposer option stops vLLM at start-up with quickdraft's message, naming the valid options.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from quickdraft.bench.vllm_peer import vllm_python
from quickdraft.integrations.vllm import OPTIONS_ENV

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PYTHON = vllm_python()
TESTS = Path(__file__).resolve().parent
K = 5
#: Distinct content per prompt, and different lengths, so vLLM's batch rows hold different requests and are
#: compacted as the shorter ones finish.
PROMPTS = [
    {"text": "Repeat exactly, three times: apple banana cherry apple banana cherry", "max_tokens": 32},
    {"text": "Count from 1 to 30, separated by commas.", "max_tokens": 24},
    {"text": "Write the word hello ten times.", "max_tokens": 16},
]

if not PYTHON.exists():
    pytest.skip(f"vLLM's environment is absent ({PYTHON}): run `make setup-vllm`", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir() -> str:
    """The embedded model as vLLM loads it (converted once, cached)."""
    done = subprocess.run([str(PYTHON), "-m", "quickdraft.integrations.model_dir"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def probe(model: str, proposer: str, **env: str) -> tuple[int, list[list[int]] | None, str]:
    """Run ``tests/vllm_probe.py``: exit code, the batch's outputs (None if it failed) and its whole log."""
    environ = {**os.environ, "PYTHONPATH": str(TESTS), **env}
    done = subprocess.run([str(PYTHON), str(TESTS / "vllm_probe.py"), model, proposer, str(K), json.dumps(PROMPTS)],
                          capture_output=True, text=True, env=environ, timeout=900)
    log = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"outputs"')]
    outputs = json.loads(lines[-1])["outputs"] if lines else None
    return done.returncode, outputs, log


@pytest.fixture(scope="module")
def plain(model_dir: str) -> list[list[int]]:
    code, outputs, log = probe(model_dir, "plain")
    assert code == 0 and outputs, log[-3000:]
    assert all(outputs), "plain vLLM produced an empty answer"
    return outputs


@pytest.mark.parametrize("proposer", ["Ngram", "Auto"])
def test_greedy_output_with_a_quickdraft_proposer_equals_plain(model_dir: str, plain: list[list[int]],
                                                               proposer: str) -> None:
    code, outputs, log = probe(model_dir, f"quickdraft.integrations.vllm.{proposer}")
    assert code == 0, log[-3000:]
    assert outputs == plain


def occurs_in(draft: list[int], tokens: list[int]) -> bool:
    n = len(draft)
    return any(tokens[i : i + n] == draft for i in range(len(tokens) - n + 1))


def test_rows_of_one_batch_draft_from_their_own_history(model_dir: str, plain: list[list[int]],
                                                        tmp_path: Path) -> None:
    """The suffix proposer (recording) on a batch: output equals plain, and every draft a row got is a run of
    that row's own tokens (a draft from another request's history would hold tokens the row never had)."""
    record = tmp_path / "record.jsonl"
    code, outputs, log = probe(model_dir, "vllm_probe.RecordingSuffix", QUICKDRAFT_TEST_RECORD=str(record))
    assert code == 0, log[-3000:]
    assert outputs == plain
    calls: list[dict[str, Any]] = [json.loads(line) for line in record.read_text().splitlines()]
    concurrent = 0
    for call in calls:
        drafted = [(row, draft) for row, draft in zip(call["rows"], call["drafts"]) if draft]
        concurrent += len(drafted) >= 2
        for row, draft in drafted:
            assert row is not None and occurs_in(draft, row), (draft, row)
    assert concurrent > 0, "no step drafted for two rows at once"
    assert max(len(c["rows"]) for c in calls) == len(PROMPTS) > len(calls[-1]["rows"]), "the batch never shrank"


def test_a_bad_proposer_option_stops_vllm_at_start_up(model_dir: str) -> None:
    code, outputs, log = probe(model_dir, "quickdraft.integrations.vllm.Suffix", **{OPTIONS_ENV: '{"bogus": 1}'})
    assert code != 0 and outputs is None
    assert "the suffix drafter has no option 'bogus'; its options are: branch_depth, datastore, max_branches" in log
