"""Load generator for an OpenAI-compatible server: concurrent streaming clients, every stream checked.

Against a running server::

    python -m quickdraft.server.loadtest --url http://127.0.0.1:8000 --clients 32 --requests 500

or, to compare batched speculation with plain batched decoding on one model in one run (the servers are
started in this process, one after the other, on loopback)::

    python -m quickdraft.server.loadtest --model default --drafter auto --clients 1,4,16 --chat \
        --dataset ../shared/specbench/question.jsonl --per-category 2 --max-tokens 128

Each client sends streaming ``/v1/completions`` (or ``--chat``) requests back to back until ``--requests``
have been sent in total; with several client counts (``--clients 1,4,16``) the load runs once per count.
The prompts are eight short built-in ones, or with ``--dataset`` the first user turn of each question of a
Spec-Bench-format JSONL file, selected as ``quickdraft bench`` selects them (``--per-category N``: the first N
of each task group). A stream counts as complete only if every event is ``data: {json}`` of the right object
type, exactly one chunk carries a finish_reason, the usage chunk is present, and ``data: [DONE]`` ends it.

Reported, one table row per client count and server: completed requests, completion tokens per second
(completion tokens of all requests / wall time), and p50 / p99 latency (a request's latency: from sending it
to the end of its stream). With ``--model``, the last line is the comparison: the speedup of the drafter over
no drafter (tokens/s with it / tokens/s without) at each client count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from quickdraft.cli_args import add_loading_arguments, parse_option
from quickdraft.models.quantized import DEFAULT_WEIGHTS

try:
    import httpx
except ImportError as error:  # a test dependency of quickdraft, not a runtime one
    raise SystemExit("the load test needs httpx: pip install 'httpx>=0.27' (or quickdraft[test])") from error

DEFAULT_PROMPTS = [
    "Summarize: The library will close for renovation from June to August. During this time, books can be "
    "returned at the community center, and the mobile library will visit each neighbourhood once a week.",
    "Rewrite with descriptive names:\ndef f(a, b):\n    c = 0\n    for d in a:\n        if d > b:\n            c += d\n"
    "    return c\n",
    "What are three tips for staying focused while studying?",
    "List the planets of the solar system in order from the sun, one per line.",
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
    "Explain what a hash table is in two sentences.",
    "Translate to French: Good morning, how are you today?",
    "Write a haiku about autumn leaves.",
]


@dataclass
class RequestRecord:
    ok: bool
    latency: float
    ttft: float | None
    completion_tokens: int
    error: str | None = None
    prompt: str = ""
    text: str = ""


@dataclass
class LoadReport:
    label: str
    clients: int
    requests: int
    wall_seconds: float
    records: list[RequestRecord] = field(default_factory=list)
    note: str = ""  # what the server reported, when it ran in this process

    @property
    def completed(self) -> int:
        return sum(r.ok for r in self.records)

    @property
    def failures(self) -> list[str]:
        return [r.error or "?" for r in self.records if not r.ok]

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.records if r.ok)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def latency(self, quantile: float) -> float:
        return _quantile([r.latency for r in self.records if r.ok], quantile)

    def ttft(self, quantile: float) -> float:
        return _quantile([r.ttft for r in self.records if r.ok and r.ttft is not None], quantile)

    def summary(self) -> str:
        return (f"{self.label}: {self.completed}/{self.requests} complete, {len(self.failures)} failed, "
                f"{self.clients} clients, latency p50 {self.latency(0.5) * 1000:.0f} ms "
                f"p99 {self.latency(0.99) * 1000:.0f} ms, ttft p50 {self.ttft(0.5) * 1000:.0f} ms "
                f"p99 {self.ttft(0.99) * 1000:.0f} ms, {self.completion_tokens} tokens in "
                f"{self.wall_seconds:.1f} s = {self.tokens_per_second:.1f} tokens/s"
                + (f"; {self.note}" if self.note else ""))


def _quantile(values: list[float], quantile: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(quantile * (len(ordered) - 1)))))
    return ordered[index]


async def one_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any], chat: bool) -> RequestRecord:
    """Send one streaming request and check the stream is complete and well-formed."""
    started = time.perf_counter()
    ttft = None
    expected_object = "chat.completion.chunk" if chat else "text_completion"
    finishes = 0
    usage = None
    done = False
    texts: list[str] = []
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return RequestRecord(False, time.perf_counter() - started, None, 0,
                                     f"HTTP {response.status_code}: {text[:200]}")
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return RequestRecord(False, time.perf_counter() - started, None, 0, "not an event stream")
            buffer = ""
            async for piece in response.aiter_text():
                buffer += piece
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    if done:
                        raise ValueError("data after [DONE]")
                    if not event.startswith("data: "):
                        raise ValueError(f"malformed event {event[:80]!r}")
                    data = event[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ValueError(f"error event: {chunk['error']}")
                    if chunk.get("object") != expected_object:
                        raise ValueError(f"wrong object {chunk.get('object')!r}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        text = choice["delta"].get("content") if chat else choice["text"]
                        if text:
                            texts.append(text)
                            if ttft is None:
                                ttft = time.perf_counter() - started
                        if choice["finish_reason"] is not None:
                            finishes += 1
            if buffer.strip():
                raise ValueError(f"trailing bytes {buffer[:80]!r}")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        return RequestRecord(False, time.perf_counter() - started, ttft, 0, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - started
    if not done:
        return RequestRecord(False, latency, ttft, 0, "stream ended without [DONE]")
    if finishes != 1:
        return RequestRecord(False, latency, ttft, 0, f"{finishes} finish_reason chunks")
    if usage is None:
        return RequestRecord(False, latency, ttft, 0, "no usage chunk")
    return RequestRecord(True, latency, ttft, int(usage["completion_tokens"]), text="".join(texts))


async def run_load(base_url: str, model: str, clients: int = 32, requests: int = 500, max_tokens: int = 32,
                   prompts: list[str] | None = None, api_key: str | None = None, chat: bool = False,
                   temperature: float = 0.0, timeout: float = 600.0, label: str = "load") -> LoadReport:
    """``requests`` streaming requests from ``clients`` concurrent clients; at most ``timeout`` seconds."""
    prompts = prompts or DEFAULT_PROMPTS
    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    counter = iter(range(requests))
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in counter:
            prompt = prompts[index % len(prompts)]
            body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                                    "stream": True, "stream_options": {"include_usage": True}, "seed": index}
            if chat:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body["prompt"] = prompt
            record = await one_stream(client, url, body, chat)
            record.prompt = prompt
            records.append(record)

    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout)) as client:
        try:
            await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), timeout)
        except asyncio.TimeoutError:
            pass
    wall = time.perf_counter() - started
    missing = requests - len(records)
    records += [RequestRecord(False, wall, None, 0, "not finished before the timeout")] * missing
    return LoadReport(label, clients, requests, wall, records)


def _served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def dataset_prompts(dataset: str, per_category: int | None = None) -> list[str]:
    """The first user turn of each question of a Spec-Bench-format JSONL file, selected as ``quickdraft bench``
    selects them (``per_category``: the first N of each task group; None: all). A missing or malformed file, or
    one without questions, raises :class:`~quickdraft.errors.InvalidRequestError` with a message for the user."""
    from quickdraft.bench.dataset import load_questions

    return [question.turns[0] for question in load_questions(dataset, per_category)]


@dataclass
class Comparison:
    """The same load served with ``drafter`` and with no drafter, at one client count (``clients``)."""

    clients: int
    with_drafter: LoadReport
    without: LoadReport

    @property
    def speedup(self) -> float:
        """Completion tokens per second with the drafter over those without (nan when nothing completed)."""
        plain = self.without.tokens_per_second
        return self.with_drafter.tokens_per_second / plain if plain > 0 else float("nan")


def compare_embedded(model: str | None, drafter: str, clients: list[int], requests: int, max_tokens: int,
                     max_batch: int, dtype: str = "auto", device: str | None = None, chat: bool = False,
                     timeout: float = 600.0, drafter_options: dict[str, Any] | None = None,
                     prompts: list[str] | None = None, threads: int | None = None,
                     weights: str = DEFAULT_WEIGHTS) -> list[Comparison]:
    """Serve ``model`` in this process with ``drafter`` and then with none, at each client count in turn; a
    fresh server for every run, warmed up by one untimed request; ``requests`` requests at each count."""
    from quickdraft.devices import leave_cpu_threads_to_a_worker
    from quickdraft.engine import Engine
    from quickdraft.server.background import start_server
    from quickdraft.server.cli import shared_drafter_options

    threads = leave_cpu_threads_to_a_worker(threads)  # each server's scheduler thread decodes, with these
    engine = Engine.from_pretrained(model, None, dtype, device, weights=weights)
    shared = shared_drafter_options(dict(drafter_options or {}), engine)
    prompts = prompts or DEFAULT_PROMPTS

    def serve(name: str, level: int) -> LoadReport:
        options = shared if name == drafter else None
        with start_server(engine, name, options, max_batch=max_batch, threads=threads,
                          max_seq_len=min(2048, engine.loaded.target.max_context)) as server:
            asyncio.run(run_load(server.url, server.model_name, 1, 1, max_tokens, prompts[:1], chat=chat,
                                 timeout=timeout, label="warm-up"))
            report = asyncio.run(run_load(server.url, server.model_name, level, requests, max_tokens, prompts,
                                          chat=chat, timeout=timeout, label=name))
            stats = server.scheduler.stats
            report.note = (f"tau {stats.tau:.2f}, {stats.accepted_tokens}/{stats.drafted_tokens} draft tokens "
                           f"accepted, {stats.batch_forwards} batched forwards (warm-up included)")
            return report

    return [Comparison(level, serve(drafter, level), serve("none", level)) for level in clients]


def table(reports: list[LoadReport]) -> list[str]:
    """One line per report: client count, label, completed requests, completion tokens/s, p50 and p99
    latency (a request's latency: from sending it to the end of its stream)."""
    lines = [f"{'clients':>7}  {'server':<24} {'done':>9} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}  notes"]
    for report in reports:
        done = f"{report.completed}/{report.requests}"
        lines.append(f"{report.clients:>7}  {report.label[:24]:<24} {done:>9} {report.tokens_per_second:>8.1f} "
                     f"{report.latency(0.5) * 1000:>8.0f} {report.latency(0.99) * 1000:>8.0f}  {report.note}")
    return lines


def comparison_line(drafter: str, comparisons: list[Comparison]) -> str:
    """At each client count, on one line: the speedup (tokens/s with ``drafter`` over tokens/s without) and
    the p50 latency with and without."""
    levels = ", ".join(f"{c.clients} client{'s' if c.clients != 1 else ''} {c.speedup:.2f}x "
                       f"(p50 {c.with_drafter.latency(0.5) * 1000:.0f}/{c.without.latency(0.5) * 1000:.0f} ms)"
                       for c in comparisons)
    return f"speedup of {drafter} over no drafter (tokens/s; p50 latency with/without): {levels}"


def positive_int(text: str) -> int:
    """An integer >= 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def client_counts(text: str) -> list[int]:
    """``--clients``: one count or several, comma-separated (``1,4,16``)."""
    return [positive_int(part) for part in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quickdraft.server.loadtest", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="serve this model in-process (or 'default'), with --drafter and without")
    parser.add_argument("--drafter", default="ngram", help="with --model: the drafter compared against none")
    parser.add_argument("--drafter-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=client_counts, default=[32], metavar="N[,N...]",
                        help="concurrent clients; several counts (1,4,16) are run one after the other (default: 32)")
    parser.add_argument("--requests", type=positive_int, default=None,
                        help="requests per client count (default: one per question with --dataset, else 500)")
    parser.add_argument("--dataset", metavar="FILE", default=None,
                        help="prompts: the first turn of each question of a Spec-Bench-format JSONL file, as "
                             "'quickdraft bench --dataset' reads it (use --chat to encode them as the bench does); "
                             "default: eight short built-in prompts")
    parser.add_argument("--per-category", metavar="N", type=int, default=None,
                        help="with --dataset: the first N questions of each task group, as 'quickdraft bench' "
                             "selects them (default: all)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    add_loading_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for --model")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--timeout", type=float, default=1800.0)
    return parser


def _prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The prompts the options ask for; a bad dataset ends the program with a message (exit status 2)."""
    from quickdraft.errors import QuickdraftError

    if args.dataset is None:
        if args.per_category is not None:
            parser.error("--per-category selects questions of a --dataset; pass --dataset FILE too")
        return DEFAULT_PROMPTS
    try:
        return dataset_prompts(args.dataset, args.per_category)
    except QuickdraftError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = _prompts(parser, args)
    requests = args.requests if args.requests is not None else (len(prompts) if args.dataset else 500)
    if args.url:
        model = _served_model(args.url, args.api_key)
        reports = [asyncio.run(run_load(args.url, model, clients, requests, args.max_tokens, prompts, args.api_key,
                                        args.chat, timeout=args.timeout, label=args.url)) for clients in args.clients]
        comparisons = []
    else:
        options = dict(parse_option(item) for item in args.drafter_option)
        comparisons = compare_embedded(args.model, args.drafter, args.clients, requests, args.max_tokens,
                                       args.max_batch, args.dtype, args.device, args.chat, args.timeout, options,
                                       prompts, args.threads, args.weights)
        reports = [report for c in comparisons for report in (c.with_drafter, c.without)]
    for report in reports:
        for failure in report.failures[:5]:
            print(f"failure ({report.label}, {report.clients} clients): {failure}")
    print("\n".join(table(reports)))
    if comparisons:
        print(comparison_line(args.drafter, comparisons))
    return 0 if all(not r.failures for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
