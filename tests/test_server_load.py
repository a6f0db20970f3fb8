"""Load on loopback (slow): 32 concurrent streaming clients, 500 requests, with and without speculation in
one run; and memory that stays flat over 1,000 sequential requests. Uses a tiny random model so that the
numbers measure the serving machinery, not a model. The load generator's command line (fast): prompts from a
Spec-Bench-format dataset, several client counts in one run, the comparison as the last line, and clear
errors for a bad dataset."""

import asyncio
import gc
import json
import re

import httpx
import pytest
import torch

from quickdraft.engine import Engine
from quickdraft.server import start_server
from quickdraft.server.loadtest import DEFAULT_PROMPTS, dataset_prompts, main, run_load

from conftest import tiny_engine

#: Allowed RSS growth over 1,000 requests after warm-up. Python's allocator and torch's CPU caching keep
#: some freed memory; a leak of even 50 KB per request would exceed this.
RSS_GROWTH_LIMIT_MB = 50


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = tiny_engine("llama")
    engine.eos_token_ids = frozenset()  # every request produces exactly max_tokens tokens
    yield engine
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_32_streaming_clients_500_requests_with_and_without_speculation(engine):
    expected = {p: engine.generate_ids(engine.tokenizer(p)["input_ids"], 32).text for p in DEFAULT_PROMPTS}
    reports = []
    for drafter in ("ngram", "none"):
        with start_server(engine, drafter, max_batch=8) as server:
            report = asyncio.run(run_load(server.url, "quickdraft", clients=32, requests=500, max_tokens=32,
                                          timeout=300, label=f"drafter {drafter}"))
            stats = server.scheduler.stats
            print(f"\n{report.summary()}; tau {stats.tau:.2f}, {stats.batch_forwards} batched forwards, "
                  f"cost curve {server.scheduler.cost_curve}")
            assert server.scheduler.active == 0 and server.scheduler.queue_depth == 0
        reports.append(report)
        assert report.failures == [], report.failures[:5]
        assert report.completed == 500
        assert report.completion_tokens == 500 * 32
        wrong = [r for r in report.records if r.text != expected[r.prompt]]
        assert not wrong, f"{len(wrong)} greedy answers differ from plain decoding"
    spec, plain = reports
    print(f"speculation vs none: {spec.tokens_per_second / plain.tokens_per_second:.2f}x tokens/s, "
          f"p50 {spec.latency(0.5) * 1000:.0f} vs {plain.latency(0.5) * 1000:.0f} ms, "
          f"p99 {spec.latency(0.99) * 1000:.0f} vs {plain.latency(0.99) * 1000:.0f} ms")


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_memory_stays_flat_over_1000_sequential_requests(engine):
    with start_server(engine, "ngram", max_batch=4) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        def request(index: int) -> None:
            body = {"model": "quickdraft", "prompt": DEFAULT_PROMPTS[index % len(DEFAULT_PROMPTS)][:40 + index % 50],
                    "max_tokens": 16, "temperature": 0.7 if index % 2 else 0, "seed": index,
                    "stream": index % 3 == 0}
            response = c.post("/v1/completions", json=body)
            assert response.status_code == 200

        for index in range(150):  # warm-up: allocator pools, caches and drafter pool reach steady state
            request(index)
        gc.collect()
        before = _rss_mb()
        for index in range(1000):
            request(index)
        gc.collect()
        after = _rss_mb()
        print(f"\nRSS {before:.1f} MB -> {after:.1f} MB after 1,000 requests ({after - before:+.1f} MB)")
        assert after - before < RSS_GROWTH_LIMIT_MB
        assert server.scheduler.stats.finished == 1150


# ---------------------------------------------------------------------- the command line (fast)

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["ABABABAB", "Now shorter."]},
    {"question_id": 2, "category": "coding", "turns": ["CDCDCD"]},
    {"question_id": 3, "category": "translation", "turns": ["EFEFEF"]},
    {"question_id": 4, "category": "translation", "turns": ["GHGHGH"]},
    {"question_id": 5, "category": "summarization", "turns": ["IJIJIJ"]},
]


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in QUESTIONS))
    return str(path)


def test_dataset_prompts_are_first_turns_selected_as_the_bench_selects_them(dataset):
    assert dataset_prompts(dataset) == ["ABABABAB", "CDCDCD", "EFEFEF", "GHGHGH", "IJIJIJ"]
    # MT-Bench's categories (writing, coding) form one task group, as in `quickdraft bench --per-category`.
    assert dataset_prompts(dataset, 1) == ["ABABABAB", "EFEFEF", "IJIJIJ"]
    assert dataset_prompts(dataset, 1) == dataset_prompts(dataset, 1)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("\n\n", "holds no questions"),
    ('{"question_id": 1, "turns": ["A"]}\n', "missing key(s) category"),
    ("not json\n", "not valid JSON"),
])
def test_a_bad_dataset_is_a_clear_error_not_a_traceback(tmp_path, capsys, content, message):
    path = tmp_path / "question.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exited:
        main(["--model", "unused", "--dataset", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_per_category_needs_a_dataset_and_client_counts_must_be_positive(capsys):
    for argv in (["--model", "unused", "--per-category", "2"], ["--model", "unused", "--clients", "1,0"],
                 ["--model", "unused", "--clients", "1,x"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
    assert "pass --dataset FILE too" in capsys.readouterr().err


def test_several_client_counts_in_one_run_end_with_the_comparison(engine, dataset, monkeypatch, capsys):
    monkeypatch.setattr(Engine, "from_pretrained", lambda *args, **kwargs: engine)
    code = main(["--model", "tiny", "--drafter", "ngram", "--clients", "1,2", "--dataset", dataset,
                 "--per-category", "1", "--max-tokens", "6", "--max-batch", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    assert re.fullmatch(r"speedup of ngram over no drafter \(tokens/s; p50 latency with/without\): "
                        r"1 client \d+\.\d\dx \(p50 \d+/\d+ ms\), 2 clients \d+\.\d\dx \(p50 \d+/\d+ ms\)", lines[-1])
    rows = [line.split() for line in lines[1:-1]]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "ngram", "3/3"), ("1", "none", "3/3"),
                                                           ("2", "ngram", "3/3"), ("2", "none", "3/3")]
    assert lines[0].split()[:6] == ["clients", "server", "done", "tok/s", "p50", "ms"]


def test_against_a_running_server_each_client_count_is_a_table_row(engine, dataset, capsys):
    with start_server(engine, "ngram", max_batch=2) as server:
        code = main(["--url", server.url, "--clients", "1,3", "--dataset", dataset, "--max-tokens", "4",
                     "--requests", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0, lines
    assert [line.split()[:3] for line in lines[1:]] == [["1", server.url, "4/4"], ["3", server.url, "4/4"]]
