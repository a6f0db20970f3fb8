"""The OpenAI-compatible server, served in-process on loopback with a tiny random model and driven by the
official ``openai`` client: answers equal plain decoding, streams are OpenAI's format, bad input gets
OpenAI's error JSON with the right status, and the server keeps serving afterwards."""

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from quickdraft.budget import CostCurve
from quickdraft.cli import build_parser, main
from quickdraft.drafters.base import Drafter
from quickdraft.engine import Engine
from quickdraft.server import start_server
from quickdraft.types import DraftTree

from conftest import CharTokenizer, registered, tiny_loaded

API_KEY = "test-key"
MODEL = "tiny-llama"


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer plus a minimal chat template: ``role: content`` lines, then ``assistant: ``."""

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self(text)["input_ids"]


@pytest.fixture(scope="module")
def engine():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared test machine: one thread keeps the suite steady
    loaded = tiny_loaded("llama")
    loaded.tokenizer = ChatCharTokenizer()
    engine = Engine(loaded)
    engine.eos_token_ids = frozenset()  # every answer runs to max_tokens (or a stop string)
    yield engine
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    # A flat cost curve: speculation always pays, so every step verifies drafts (the harder case).
    with start_server(engine, "ngram", model_name=MODEL, api_key=API_KEY, max_batch=4,
                      cost_curve=CostCurve.flat()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


def plain(engine, prompt_ids, max_tokens, stop=None):
    return engine.generate_ids(prompt_ids, max_tokens, stop=stop)


PROMPT = "ABCDABCDABCXYZ"


def test_completion_equals_plain_decoding(engine, client):
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    want = plain(engine, engine.tokenizer(PROMPT)["input_ids"], 24)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.object == "text_completion" and got.model == MODEL
    assert got.usage.prompt_tokens == len(PROMPT) and got.usage.completion_tokens == 24
    assert got.usage.total_tokens == len(PROMPT) + 24


def test_streamed_completion_equals_plain_decoding(engine, client):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    want = plain(engine, engine.tokenizer(PROMPT)["input_ids"], 30)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ABABABAB"}]


def test_chat_equals_plain_decoding(engine, client):
    got = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=20, temperature=0)
    want = plain(engine, engine.encode_prompt(MESSAGES), 20)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 20


def test_streamed_chat_equals_plain_decoding_and_uses_openai_chunks(engine, client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=25, temperature=0,
                                            stream=True)
    chunks = list(stream)
    want = plain(engine, engine.encode_prompt(MESSAGES), 25)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].delta.content is None
    assert len({c.id for c in chunks}) == 1


def test_raw_stream_is_exactly_sse(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        json.loads(event[6:])


def test_stop_strings_match_the_engine(engine, client):
    ids = engine.tokenizer(PROMPT)["input_ids"]
    full = plain(engine, ids, 40).text
    stop = full[12:14]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "@@@"])
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_each_equals_plain_decoding(engine, server):
    prompts = ["ABCABCABC", "XYZXYZ", "HELLOHELLOHE", "QQQQ", "ABCDEFGHIJKLMNOP", "MNMNMNMNMN", "K", "ZYXWVU"]
    lengths = [30, 12, 45, 20, 8, 36, 25, 16]
    want = [plain(engine, engine.tokenizer(p)["input_ids"], n).text for p, n in zip(prompts, lengths)]
    forwards_before = server.scheduler.stats.batch_forwards

    async def run():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as client:
            async def one(prompt, length, stream):
                if not stream:
                    reply = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=length,
                                                            temperature=0)
                    return reply.choices[0].text
                parts = []
                async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=length,
                                                                   temperature=0, stream=True):
                    parts.append(chunk.choices[0].text)
                return "".join(parts)

            return await asyncio.gather(*(one(p, n, i % 2 == 0) for i, (p, n) in enumerate(zip(prompts, lengths))))

    assert asyncio.run(run()) == want
    used = server.scheduler.stats.batch_forwards - forwards_before
    assert used < sum(lengths) / 2, "concurrent requests should share target forwards"


def test_models_health_and_metrics(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/health").json()["status"] == "ok"
    completion = {"model": MODEL, "prompt": "AB", "max_tokens": 2}
    assert http.post("/v1/completions", json=completion).status_code == 200
    text = http.get("/metrics").text
    for name in ("quickdraft_requests_total{", "quickdraft_tau ", "quickdraft_queue_depth ",
                 "quickdraft_request_latency_seconds_bucket{", "quickdraft_completion_tokens_total ",
                 "quickdraft_step_seconds_count "):
        assert name in text
    assert "# TYPE quickdraft_request_latency_seconds histogram" in text


def test_openai_client_errors_are_typed(client):
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model=MODEL, prompt="AB", max_tokens=3, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="AB", max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


GOOD = {"model": MODEL, "prompt": "ABAB", "max_tokens": 4, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "AB"}], "max_tokens": 4}


def with_(base, **changes):
    body = dict(base)
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


BAD_REQUESTS = [
    # (id, path, body (dict: JSON, bytes: raw), headers, status, param, code)
    ("malformed-json", "/v1/completions", b'{"model": "x", ', None, 400, None, "invalid_json"),
    ("json-array", "/v1/completions", b"[1, 2]", None, 400, None, "invalid_json"),
    ("nan-literal", "/v1/completions", b'{"model": "tiny-llama", "prompt": "A", "temperature": NaN}', None, 400,
     None, "invalid_json"),
    ("missing-model", "/v1/completions", with_(GOOD, model=...), None, 400, "model", "missing_required_parameter"),
    ("unknown-model", "/v1/completions", with_(GOOD, model="gpt-4"), None, 404, "model", "model_not_found"),
    ("model-wrong-type", "/v1/completions", with_(GOOD, model=7), None, 400, "model", "invalid_type"),
    ("missing-prompt", "/v1/completions", with_(GOOD, prompt=...), None, 400, "prompt", "missing_required_parameter"),
    ("empty-prompt", "/v1/completions", with_(GOOD, prompt=""), None, 400, "prompt", "invalid_value"),
    ("prompt-wrong-type", "/v1/completions", with_(GOOD, prompt={"text": "A"}), None, 400, "prompt", "invalid_type"),
    ("several-prompts", "/v1/completions", with_(GOOD, prompt=["A", "B"]), None, 400, "prompt",
     "unsupported_parameter"),
    ("prompt-over-context", "/v1/completions", with_(GOOD, prompt="A" * 600), None, 400, "prompt",
     "context_length_exceeded"),
    ("token-id-out-of-vocab", "/v1/completions", with_(GOOD, prompt=[1, 2, 5000]), None, 400, "prompt", None),
    ("missing-messages", "/v1/chat/completions", with_(CHAT, messages=...), None, 400, "messages",
     "missing_required_parameter"),
    ("empty-messages", "/v1/chat/completions", with_(CHAT, messages=[]), None, 400, "messages", "invalid_value"),
    ("message-not-object", "/v1/chat/completions", with_(CHAT, messages=["hi"]), None, 400, "messages[0]",
     "invalid_type"),
    ("message-bad-role", "/v1/chat/completions", with_(CHAT, messages=[{"role": "robot", "content": "A"}]), None,
     400, "messages[0].role", "invalid_value"),
    ("message-image", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), None, 400, "messages[0].content",
     "unsupported_content"),
    ("all-messages-blank", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": "  "}]), None,
     400, "messages", None),
    ("max-tokens-zero", "/v1/completions", with_(GOOD, max_tokens=0), None, 400, "max_tokens", "invalid_value"),
    ("max-tokens-string", "/v1/completions", with_(GOOD, max_tokens="10"), None, 400, "max_tokens", "invalid_type"),
    ("max-tokens-float", "/v1/completions", with_(GOOD, max_tokens=2.5), None, 400, "max_tokens", "invalid_type"),
    ("max-completion-tokens-negative", "/v1/chat/completions", with_(CHAT, max_completion_tokens=-3), None, 400,
     "max_completion_tokens", "invalid_value"),
    ("temperature-negative", "/v1/completions", with_(GOOD, temperature=-0.5), None, 400, "temperature",
     "invalid_value"),
    ("temperature-too-high", "/v1/completions", with_(GOOD, temperature=2.5), None, 400, "temperature",
     "invalid_value"),
    ("temperature-string", "/v1/completions", with_(GOOD, temperature="hot"), None, 400, "temperature",
     "invalid_type"),
    ("top-p-zero", "/v1/completions", with_(GOOD, top_p=0), None, 400, "top_p", "invalid_value"),
    ("top-p-above-one", "/v1/completions", with_(GOOD, top_p=1.5), None, 400, "top_p", "invalid_value"),
    ("n-two", "/v1/completions", with_(GOOD, n=2), None, 400, "n", "unsupported_parameter"),
    ("stop-wrong-type", "/v1/completions", with_(GOOD, stop=[1, 2]), None, 400, "stop", "invalid_type"),
    ("seed-string", "/v1/completions", with_(GOOD, seed="abc"), None, 400, "seed", "invalid_type"),
    ("stream-string", "/v1/completions", with_(GOOD, stream="yes"), None, 400, "stream", "invalid_type"),
    ("stream-options-without-stream", "/v1/completions", with_(GOOD, stream_options={"include_usage": True}), None,
     400, "stream_options", "invalid_value"),
    ("presence-penalty", "/v1/completions", with_(GOOD, presence_penalty=0.5), None, 400, "presence_penalty",
     "unsupported_parameter"),
    ("frequency-penalty", "/v1/chat/completions", with_(CHAT, frequency_penalty=-1), None, 400, "frequency_penalty",
     "unsupported_parameter"),
    ("logprobs", "/v1/completions", with_(GOOD, logprobs=5), None, 400, "logprobs", "unsupported_parameter"),
    ("chat-logprobs", "/v1/chat/completions", with_(CHAT, logprobs=True), None, 400, "logprobs",
     "unsupported_parameter"),
    ("echo", "/v1/completions", with_(GOOD, echo=True), None, 400, "echo", "unsupported_parameter"),
    ("tools", "/v1/chat/completions", with_(CHAT, tools=[{"type": "function"}]), None, 400, "tools",
     "unsupported_parameter"),
    ("unknown-parameter", "/v1/completions", with_(GOOD, frobnicate=1), None, 400, "frobnicate", "unknown_parameter"),
    ("no-api-key", "/v1/completions", GOOD, {"Authorization": ""}, 401, None, "missing_api_key"),
    ("wrong-api-key", "/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    ("wrong-auth-scheme", "/v1/models", None, {"Authorization": f"Basic {API_KEY}"}, 401, None, "invalid_api_key"),
    ("oversized-body", "/v1/completions", with_(GOOD, prompt="A" * (1 << 20)), None, 413, None, "request_too_large"),
    ("unknown-route", "/v1/embeddings", GOOD, None, 404, None, "not_found"),
    ("wrong-method", "/v1/completions", "GET", None, 405, None, "method_not_allowed"),
    ("deeply-nested-json", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, None, 400, None, "invalid_json"),
    ("deeply-nested-parameter", "/v1/completions",
     b'{"model": "tiny-llama", "prompt": "AB", "logit_bias": ' + b"[" * 900 + b"]" * 900 + b"}", None, 400, None,
     "invalid_json"),
    ("max-tokens-over-context", "/v1/completions", with_(GOOD, prompt="A" * 500, max_tokens=13), None, 400,
     "prompt", "context_length_exceeded"),
    ("max-completion-tokens-over-context", "/v1/chat/completions",
     with_(CHAT, messages=[{"role": "user", "content": "A" * 400}], max_completion_tokens=10**9), None, 400,
     "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize("path, body, headers, status, param, code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_openai_error_json_and_the_server_keeps_serving(engine, http, path, body, headers, status,
                                                                       param, code):
    if body == "GET":
        response = http.get(path, headers=headers)
    elif body is None:
        response = http.get(path, headers=headers)
    elif isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json", **(headers or {})})
    else:
        response = http.post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    assert error["code"] == code
    good = http.post("/v1/completions", json=GOOD)
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == plain(engine, engine.tokenizer("ABAB")["input_ids"], 4).text


def test_streamed_request_over_context_fails_before_the_stream_starts(http):
    body = with_(GOOD, prompt="A" * 600, stream=True)
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_oversized_chunked_body_is_refused(http):
    def chunks():
        for _ in range(20):
            yield b" " * 65536  # 1.25 MiB of JSON whitespace, no Content-Length

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_max_tokens_over_the_context_is_a_400_naming_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="A" * 500, max_tokens=10**9, temperature=0)
    error = raised.value.body
    assert error["code"] == "context_length_exceeded"
    assert error["message"] == ("This model's maximum context length is 512 tokens. However, you requested "
                                "1000000500 tokens (500 in the prompt, 1000000000 in the completion). Please "
                                "reduce the length of the prompt or completion.")
    with pytest.raises(openai.BadRequestError, match=r"\(400 in the messages, 113 in the completion\)"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A" * 382}],
                                       max_tokens=113)
    exact = client.completions.create(model=MODEL, prompt="A" * 500, max_tokens=12, temperature=0)
    assert exact.usage.completion_tokens == 12 and exact.choices[0].finish_reason == "length"


def test_omitted_max_tokens_fills_what_the_context_leaves(client):
    """Without max_tokens, chat fills the rest of the context and completions' default of 16 shrinks to fit."""
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A" * 482}],
                                          temperature=0)
    assert chat.usage.prompt_tokens == 500 and chat.usage.completion_tokens == 12
    assert chat.choices[0].finish_reason == "length"
    short = client.completions.create(model=MODEL, prompt="A" * 500, temperature=0)
    assert short.usage.completion_tokens == 12
    default = client.completions.create(model=MODEL, prompt="AB", temperature=0)
    assert default.usage.completion_tokens == 16


def test_unsupported_neutral_values_and_extensions_are_accepted(engine, http):
    body = with_(GOOD, presence_penalty=0, frequency_penalty=0.0, n=1, logprobs=None, user="u", seed=3, top_k=0,
                 echo=False, best_of=1, logit_bias={})
    assert http.post("/v1/completions", json=body).status_code == 200
    chat = with_(CHAT, tools=[], tool_choice="none", response_format={"type": "text"}, temperature=0,
                 messages=[{"role": "developer", "content": [{"type": "text", "text": "AB"}]},
                           {"role": "user", "content": "AB"}])
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_seeded_sampling_is_reproducible_through_the_api(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.9, top_p=0.95, seed=42)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def _wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class SlowDrafter(Drafter):
    """Drafts nothing, slowly (so a request is surely still running when its client leaves); counts ends."""

    ended = 0

    def propose(self, ctx, budget):
        time.sleep(0.01)
        return DraftTree.empty()

    def end(self):
        type(self).ended += 1


@pytest.fixture(scope="module")
def slow_server(engine):
    with start_server(engine, "test-slow-server", model_name=MODEL, max_batch=2,
                      cost_curve=CostCurve.flat()) as running:
        yield running


def _raw_request(server, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.http.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_request_in_the_scheduler(slow_server, stream):
    scheduler = slow_server.scheduler
    cancelled, ended = scheduler.stats.cancelled, SlowDrafter.ended
    disconnects = slow_server.http.server.config.app.state.metrics.disconnects
    sock = _raw_request(slow_server, {"model": MODEL, "prompt": "ABC", "max_tokens": 400, "temperature": 0,
                                      "stream": stream})
    assert _wait_until(lambda: scheduler.active == 1)
    if stream:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()  # 400 tokens at >= 10 ms each: the request is still running
    assert _wait_until(lambda: scheduler.active == 0, timeout=3)
    assert scheduler.stats.cancelled == cancelled + 1
    assert SlowDrafter.ended == ended + 1
    assert f"quickdraft_client_disconnects_total {disconnects + 1}" in httpx.get(slow_server.url + "/metrics").text
    with httpx.Client(base_url=slow_server.url, timeout=30) as c:
        assert c.post("/v1/completions", json=with_(GOOD, max_tokens=2)).status_code == 200


def test_serve_cli_reports_bad_arguments_with_exit_status_2(capsys):
    assert main(["serve", "--model", "/no/such/model", "--port", "0"]) == 2
    assert main(["serve", "--drafter", "no-such-drafter", "--port", "0"]) == 2
    assert main(["serve", "--max-batch", "0", "--port", "0"]) == 2
    capsys.readouterr()
    # Checked before a model loads: the model path does not exist, yet the error is about the option.
    assert main(["serve", "--drafter", "suffix", "--drafter-option", "depth=3", "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "the suffix drafter has no option 'depth'" in err and "does not exist" not in err
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None


def test_health_says_unavailable_with_503_when_the_scheduler_is_not_running(engine):
    from fastapi.testclient import TestClient

    from quickdraft.batching import BatchScheduler
    from quickdraft.server.app import create_app

    scheduler = BatchScheduler(engine, "ngram", max_batch=1, cost_curve=CostCurve.flat())
    with TestClient(create_app(scheduler, MODEL)) as http:
        assert not scheduler.running
        response = http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"
        scheduler.start()
        try:
            assert scheduler.running and http.get("/health").status_code == 200
        finally:
            scheduler.close()
        assert not scheduler.running and http.get("/health").status_code == 503


def test_a_datastore_path_is_loaded_once_and_shared_by_every_slot_drafter(tmp_path):
    from quickdraft.drafters import DrafterSetup, create_drafter
    from quickdraft.drafters.datastore import StaticAutomaton, build_datastore
    from quickdraft.server.cli import shared_drafter_options

    path = tmp_path / "store.npz"
    build_datastore([[10, 11, 12, 13], [20, 21]], path)
    options = shared_drafter_options({"datastore": str(path)}, engine=None)
    assert isinstance(options["datastore"], StaticAutomaton)
    loaded = tiny_loaded("llama")
    setup = DrafterSetup(loaded.target, loaded.tokenizer, options)
    first, second = create_drafter("suffix", setup), create_drafter("suffix", setup)
    auto = create_drafter("auto", setup)
    assert first.datastore is second.datastore is auto.sources[0].datastore is options["datastore"]


# ---------------------------------------------------------------------- shutdown faults


class StuckDrafter(Drafter):
    """Blocks in propose until released (at most 30 s): a scheduler stuck in a step."""

    release = threading.Event()

    def propose(self, ctx, budget):
        type(self).release.wait(30)
        return DraftTree.empty()


@pytest.fixture(autouse=True, scope="module")
def test_drafters():
    """This module's test drafters, in the registry while its tests run."""
    with registered({"test-slow-server": SlowDrafter, "test-stuck-server": StuckDrafter}):
        yield


def test_a_client_waiting_on_a_scheduler_closed_while_stuck_gets_503(engine):
    StuckDrafter.release.clear()
    try:
        with start_server(engine, "test-stuck-server", model_name=MODEL, max_batch=1,
                          cost_curve=CostCurve.flat()) as server, \
                httpx.Client(base_url=server.url, timeout=10) as http, ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/v1/completions", json=with_(GOOD, max_tokens=20))
            assert _wait_until(lambda: server.scheduler.active == 1)
            server.scheduler.close(timeout=0.2)  # the step never ends: its thread is left behind
            response = pending.result(timeout=10)
    finally:
        StuckDrafter.release.set()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down"


FAULT_PROMPTS = ["ABCABCAB", "XYZXYZ", "HELLOHELLO", "QQQQ", "MNMNMNMN", "KLKLK"]
FAULT_TOKENS = 40


def _fault_engine(native: bool) -> Engine:
    loaded = tiny_loaded("llama", native=native)
    loaded.tokenizer = ChatCharTokenizer()
    engine = Engine(loaded)
    engine.eos_token_ids = frozenset()
    return engine


async def _outcome(client: httpx.AsyncClient, prompt: str, stream: bool) -> tuple[str, str]:
    """``("complete", text)`` for an answer reported complete, ``("error", code)`` for an error."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": FAULT_TOKENS, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        raw = (await response.aread()).decode()
    if response.status_code != 200:
        assert response.status_code == 503, raw
        return "error", json.loads(raw)["error"]["code"]
    if not stream:
        reply = json.loads(raw)
        assert reply["usage"]["completion_tokens"] == FAULT_TOKENS, f"truncated, reported complete: {reply}"
        return "complete", reply["choices"][0]["text"]
    events = [line[6:] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"the stream ended without [DONE]: {raw[-200:]!r}"
    chunks = [json.loads(event) for event in events[:-1]]
    if "error" in chunks[-1]:
        return "error", chunks[-1]["error"]["code"]
    assert chunks[-1]["usage"]["completion_tokens"] == FAULT_TOKENS, f"truncated, reported complete: {chunks[-1]}"
    return "complete", "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


@pytest.mark.parametrize("native", [True, False], ids=["batched", "transformers-fallback"])
def test_closing_the_scheduler_under_load_answers_every_client_in_full_or_with_an_error(native):
    engine = _fault_engine(native)
    want = {p: plain(engine, engine.tokenizer(p)["input_ids"], FAULT_TOKENS).text for p in FAULT_PROMPTS}

    async def load(server) -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            clients = [asyncio.ensure_future(_outcome(client, p, i % 2 == 0)) for i, p in enumerate(FAULT_PROMPTS)]
            deadline = time.monotonic() + 20
            while server.scheduler.stats.finished < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.scheduler.close)  # stop mid-load: some done, one running, some queued
            outcomes = await asyncio.wait_for(asyncio.gather(*clients), timeout=30)
            late = await client.post("/v1/completions", json=with_(GOOD, max_tokens=2))
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            return outcomes

    with start_server(engine, "test-slow-server", model_name=MODEL, max_batch=2,
                      cost_curve=CostCurve.flat()) as server:
        outcomes = asyncio.run(load(server))
    for prompt, (kind, value) in zip(FAULT_PROMPTS, outcomes):
        if kind == "complete":
            assert value == want[prompt]
        else:
            assert value == "shutting_down"
    kinds = [kind for kind, _ in outcomes]
    assert "complete" in kinds and "error" in kinds, kinds


# ---------------------------------------------------------------------- request parsing (no server)


def _parse_error(body: dict, chat: bool = False):
    from quickdraft.server.protocol import APIError, parse_chat, parse_completion

    with pytest.raises(APIError) as raised:
        (parse_chat if chat else parse_completion)(body, {MODEL})
    return raised.value


@pytest.mark.parametrize("body, chat, param, code, message", [
    (with_(GOOD, stream=True, stream_options={"include_usage": True, "x": 1}), False, "stream_options",
     "unknown_parameter", "Unrecognized stream_options field: x"),
    (with_(GOOD, stream=True, stream_options={"include_usage": 1}), False, "stream_options.include_usage",
     "invalid_type", "Invalid type for 'stream_options.include_usage': expected a boolean, but got a number."),
    (with_(GOOD, prompt=[1, "A"]), False, "prompt", "invalid_type",
     "Invalid type for 'prompt': expected a string or a list of token ids, but got an array."),
    (with_(GOOD, min_p=1.5), False, "min_p", "invalid_value", "min_p must be in [0, 1) (0 disables it), got 1.5"),
    (with_(GOOD, prompt=""), False, "prompt", "invalid_value", "the prompt is empty; pass some text to continue"),
    (with_(GOOD, prompt=[]), False, "prompt", "invalid_value", "the prompt is empty; pass at least one token"),
    (with_(GOOD, max_tokens=0), False, "max_tokens", "invalid_value", "max_tokens must be an integer >= 1, got 0"),
    (with_(GOOD, stop=["x"] * 17), False, "stop", "invalid_value", "at most 16 stop strings are supported, got 17"),
    (with_(GOOD, presence_penalty=False), False, "presence_penalty", "unsupported_parameter",
     "'presence_penalty' is not supported by this server (got False); omit it or leave it at its default"),
    (with_(CHAT, messages=[{"role": "user", "content": "A", "tool_calls": [{}]}]), True, "messages[0].tool_calls",
     "unsupported_parameter", None),
    (with_(CHAT, messages=[{"content": "A"}]), True, "messages[0].role", "missing_required_parameter", None),
    (with_(CHAT, messages=[{"role": "user", "content": None}]), True, "messages[0].content", "invalid_type", None),
])
def test_parse_errors_name_the_field_by_its_path(body, chat, param, code, message):
    error = _parse_error(body, chat)
    assert (error.status, error.param, error.code) == (400, param, code)
    if message is not None:
        assert error.message == message


def test_parse_treats_null_as_omitted_and_normalizes_prompts_and_messages():
    from quickdraft.server.protocol import parse_chat, parse_completion

    nulls = with_(GOOD, prompt=["ABAB"], stop=None, n=None, seed=None, logprobs=None, top_k=-1, max_tokens=None)
    parsed = parse_completion(nulls, {MODEL})
    assert parsed.prompt == "ABAB" and parsed.stop == [] and parsed.max_tokens == 16 and not parsed.max_tokens_given
    assert parsed.params.top_k == 0 and parsed.params.temperature == 0
    assert parse_completion(with_(GOOD, prompt=[[1, 2]], seed=2**64 - 1), {MODEL}).params.seed == 2**63 - 1
    assert parse_completion(with_(GOOD, prompt=" "), {MODEL}).prompt == " "  # continued as it is: not empty
    chat = parse_chat(with_(CHAT, max_tokens=3, max_completion_tokens=5, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]), {MODEL})
    assert chat.prompt == [{"role": "system", "content": "AB"}] and chat.max_tokens == 5 and chat.max_tokens_given
