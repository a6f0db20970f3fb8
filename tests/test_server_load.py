"""Load on loopback (slow): 32 concurrent streaming clients, 500 requests, with and without speculation in
one run; and memory that stays flat over 1,000 sequential requests. Uses a tiny random model so that the
numbers measure the serving machinery, not a model."""

import asyncio
import gc

import httpx
import pytest
import torch

from conftest import tiny_engine
from quickdraft.server import start_server
from quickdraft.server.loadtest import DEFAULT_PROMPTS, run_load

pytestmark = pytest.mark.slow

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
