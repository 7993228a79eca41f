"""The remote engine against scripted servers (httpx2.MockTransport answering with real SSE bodies): the stream
as each kind of server writes it, the parameters each kind is sent, every failure as its one line, and the
context trimmed as the server's counts or errors say. No model, no server, no network (one test uses a real
socket on 127.0.0.1, with nothing listening)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest

from chat.conversation import Conversation
from chat.engine import Reasoning, ReplyRequest
from chat.errors import ChatError, UsageError
from chat.params import GenerationParams
from chat.remote import RemoteEngine, RemoteReply, connect, sse_data
from chat.signals import Signals

BASE = "http://127.0.0.1:8000/v1"
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
KEY = "sk-very-secret-key"
SSE = {"content-type": "text/event-stream"}
ALL_CHOSEN = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
PARAMS = GenerationParams(
    max_new_tokens=64, min_new_tokens=2, temperature=0.5, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=7
)


def chunk(content: str | None = None, *, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse(*events: dict[str, Any] | str, done: bool = True) -> bytes:
    """An SSE body: a dict is one `data:` event, a str a raw line (a keep-alive comment, say)."""
    text = "".join(f"data: {json.dumps(e)}\n\n" if isinstance(e, dict) else f"{e}\n" for e in events)
    return (text + ("data: [DONE]\n\n" if done else "")).encode()


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


class Stream(httpx2.SyncByteStream):
    """A streamed body read piece by piece: `between` runs before each piece after the first (it may raise,
    as a broken connection or a Ctrl+C would); `closed` says whether the client hung up."""

    def __init__(self, pieces: list[bytes], between: Callable[[int], None] = lambda n: None):
        self.pieces, self.between, self.closed = pieces, between, False

    def __iter__(self) -> Iterator[bytes]:
        for number, piece in enumerate(self.pieces):
            if number:
                self.between(number)
            yield piece

    def close(self) -> None:
        self.closed = True


Answer = bytes | tuple[int, Any] | Callable[[httpx2.Request], httpx2.Response]


class Server:
    """A scripted OpenAI-compatible server: /models, other GET routes, and a queue of chat/completions answers
    (the last one repeats); what each request carried is kept."""

    def __init__(self, owned_by: str = "vllm", *answers: Answer, entries: list[Any] | None = None, **entry: Any):
        self.entries = [{"id": MODEL, "object": "model", "owned_by": owned_by, **entry}] if entries is None else entries
        self.answers = list(answers) or [sse(chunk("Hi"), done=True)]
        self.routes: dict[str, tuple[int, Any]] = {}
        self.requests: list[httpx2.Request] = []
        self.posts: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if request.method == "GET" and path == "/v1/models":
            return httpx2.Response(200, json={"object": "list", "data": self.entries})
        if request.method == "GET" and path in self.routes:
            status, body = self.routes[path]
            return httpx2.Response(status, json=body)
        if request.method == "POST" and path == "/v1/chat/completions":
            self.posts.append(json.loads(request.content))
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if callable(answer):
                return answer(request)
            if isinstance(answer, bytes):
                return httpx2.Response(200, headers=SSE, content=answer)
            status, body = answer
            if isinstance(body, str):
                return httpx2.Response(status, text=body)
            return httpx2.Response(status, json=body)
        return httpx2.Response(404, json={"detail": "Not Found"})

    def engine(self, model: str | None = None, api_key: str | None = None, base: str = BASE, **kw: Any):
        return connect(base, model, api_key, transport=httpx2.MockTransport(self), **kw)


def conversation(*turns: str, system: str | None = None) -> Conversation:
    """Messages alternating user, assistant, ..., the last one the user's."""
    talk = Conversation(system=system)
    for number, text in enumerate(turns):
        talk.add("user" if number % 2 == 0 else "assistant", text)
    return talk


def ask(talk: Conversation, chosen: tuple[str, ...] = (), policy: str = "drop-oldest", params=PARAMS) -> ReplyRequest:
    return ReplyRequest(talk, params, frozenset(chosen), policy, Signals())


def run(engine: RemoteEngine, request: ReplyRequest) -> tuple[RemoteReply, list[str]]:
    reply = engine.reply(request)
    reply.start()
    return reply, list(reply)


# ---- the stream ----


def test_stream_with_keepalives_usage_chunk_and_leading_space():
    server = Server(
        "vllm",
        sse(
            ": ping",
            chunk(role="assistant"),
            ": keep-alive",
            chunk("\n  "),
            chunk("Hello"),
            "event: message",
            chunk(" world", finish="stop"),
            usage(12, 3),
        ),
    )
    engine = server.engine()
    reply, pieces = run(engine, ask(conversation("hi")))
    assert (pieces, reply.text, reply.finish, reply.error) == (["Hello", " world"], "Hello world", "eos", None)
    assert (reply.stats.prompt_tokens, reply.stats.new_tokens) == (12, 3)
    assert reply.stats.ttft_ms >= 0 and reply.stats.decode_tok_s >= 0
    assert engine.context_tokens(conversation("hi")) == 15
    assert server.posts[0] == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_stream_without_done_ends_on_its_last_finish_reason():
    server = Server("vllm", sse(chunk("one"), chunk(" two"), chunk(" three", finish="length"), done=False))
    engine = server.engine()
    reply, pieces = run(engine, ask(conversation("count")))
    assert (pieces, reply.finish) == (["one", " two", " three"], "length")
    assert (reply.stats.prompt_tokens, reply.stats.new_tokens) == (0, 3)  # no usage: the pieces counted
    assert engine.context_tokens(conversation("count")) is None


def test_a_stream_that_just_ends_is_eos():
    reply, pieces = run(Server("vllm", sse(chunk("fine"), done=False)).engine(), ask(conversation("hi")))
    assert (pieces, reply.finish) == (["fine"], "eos")


def test_reasoning_pieces_are_reasoning_and_not_in_the_text():
    body = sse(
        chunk(reasoning_content="Let me"),
        chunk(reasoning=" think."),
        chunk("\n\nFour."),
        chunk(finish="stop"),
    )
    reply, pieces = run(Server("llamacpp", body).engine(), ask(conversation("2+2?")))
    assert pieces == ["Let me", " think.", "Four."]
    assert [type(p) is Reasoning for p in pieces] == [True, True, False]
    assert (reply.text, reply.finish) == ("Four.", "eos")


@pytest.mark.parametrize(
    ("error_line", "said"),
    [
        (
            b'data: {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}}\n\n',
            "CUDA out of memory",
        ),
        (b'data: {"object": "error", "message": "engine dead"}\n\n', "engine dead"),
        (b'data: {"error": "the "model" failed"}\n\n', '{"error": "the "model" failed"}'),  # transformers serve
    ],
)
def test_an_error_chunk_mid_stream_keeps_the_partial_text(error_line, said):
    body = sse(chunk("Half a"), chunk(" reply"), done=False) + error_line + sse(chunk(" never"))
    reply, pieces = run(Server("vllm", body).engine(), ask(conversation("hi")))
    assert (pieces, reply.text, reply.finish) == (["Half a", " reply"], "Half a reply", "error")
    assert reply.error == f"the server stopped with an error: {said}"


def streamed(pieces: list[bytes], between: Callable[[int], None] = lambda n: None):
    stream = Stream(pieces, between)
    return stream, lambda request: httpx2.Response(200, headers=SSE, stream=stream)


def test_a_broken_connection_mid_stream_ends_the_reply_with_an_error():
    def broken(number: int) -> None:
        raise httpx2.RemoteProtocolError("peer closed connection without sending complete message body")

    stream, answer = streamed([sse(chunk("So far"), done=False), sse(chunk(" not this"))], broken)
    reply, pieces = run(Server("vllm", answer).engine(), ask(conversation("hi")))
    assert (pieces, reply.finish) == (["So far"], "error")
    assert reply.error == (
        f"the connection to {BASE} broke mid-reply (peer closed connection without sending complete message body)"
    )
    assert stream.closed


def test_a_read_timeout_mid_stream_ends_the_reply_with_an_error():
    def silent(number: int) -> None:
        raise httpx2.ReadTimeout("timed out")

    _, answer = streamed([sse(chunk("So far"), done=False), b""], silent)
    reply, pieces = run(Server("vllm", answer).engine(timeout_s=30), ask(conversation("hi")))
    assert (pieces, reply.finish, reply.error) == (["So far"], "error", "the server sent nothing for 30 s")


def test_a_line_separator_in_the_text_does_not_split_the_event():
    _, pieces = run(Server("vllm", sse(chunk("a\u2028b\x85c"))).engine(), ask(conversation("hi")))
    assert pieces == ["a\u2028b\x85c"]
    assert list(sse_data([b"data: x\r", b"\ndata: y\rdata: z"])) == ["x", "y", "z"]


def test_a_server_that_does_not_stream_is_read_whole():
    def whole(request: httpx2.Request) -> httpx2.Response:
        body = {
            "choices": [{"message": {"content": "All at once."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3},
        }
        return httpx2.Response(200, json=body)

    reply, pieces = run(Server("vllm", whole).engine(), ask(conversation("hi")))
    assert (pieces, reply.finish, reply.stats.new_tokens) == (["All at once."], "eos", 3)


# ---- Ctrl+C and closing signals ----


def test_stop_is_read_after_each_chunk_and_the_stream_is_closed():
    request = ask(conversation("count"))

    def ctrl_c(number: int) -> None:
        if number == 2:  # the signal arrives while the second chunk is read
            request.signals.stop = True

    stream, answer = streamed([sse(chunk(f"{n} "), done=False) for n in range(1, 6)], ctrl_c)
    engine = Server("vllm", answer).engine()
    reply = engine.reply(request)
    reply.start()
    assert request.signals.blocking is True  # in flight: a Ctrl+C interrupts the socket read
    assert list(reply) == ["1 ", "2 ", "3 "]
    assert (reply.text, reply.finish, stream.closed, request.signals.blocking) == ("1 2 3 ", "interrupted", True, False)


def test_a_keyboard_interrupt_in_the_read_closes_the_connection():
    def interrupt(number: int) -> None:
        raise KeyboardInterrupt

    stream, answer = streamed([sse(chunk("Partial"), done=False), sse(chunk(" more"))], interrupt)
    request = ask(conversation("hi"))
    reply = Server("vllm", answer).engine().reply(request)
    reply.start()
    pieces = []
    with pytest.raises(KeyboardInterrupt):
        for piece in reply:
            pieces.append(piece)
    assert (pieces, reply.text, reply.finish) == (["Partial"], "Partial", "interrupted")
    assert stream.closed and request.signals.blocking is False


def test_a_reply_left_unread_is_closed_by_the_next_one_and_by_close():
    first, answer = streamed([sse(chunk("a"))])
    second, later = streamed([sse(chunk("b"))])
    engine = Server("vllm", answer, later).engine()
    engine.reply(ask(conversation("hi"))).start()
    engine.reply(ask(conversation("hi"))).start()
    assert (first.closed, second.closed) == (True, False)
    engine.close()
    assert second.closed


# ---- parameters ----


def body_params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("model", "messages", "stream", "stream_options")}


# What vLLM and SGLang are sent when the user set every parameter: each under its own name.
EVERY_PARAMETER = {
    "max_tokens": 64,
    "temperature": 0.5,
    "top_p": 0.9,
    "seed": 7,
    "top_k": 20,
    "repetition_penalty": 1.1,
    "min_tokens": 2,
}


@pytest.mark.parametrize(
    ("owned_by", "sent", "notices", "dropped"),
    [
        (
            "vllm",
            EVERY_PARAMETER,
            [],
            None,
        ),
        (
            "sglang",
            EVERY_PARAMETER,
            [],
            None,
        ),
        (
            "llamacpp",
            {"max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": 7, "top_k": 20, "repeat_penalty": 1.1},
            ["(min_new_tokens not sent: llama-server takes no min_tokens)"],
            "min_new_tokens (not taken by llama-server)",
        ),
        (
            "library",
            {"max_tokens": 64, "temperature": 0.5, "top_p": 0.9, "seed": 7},
            [
                "(top_k not sent: ollama takes no top_k)",
                "(repetition_penalty not sent: ollama takes no repetition_penalty)",
                "(min_new_tokens not sent: ollama takes no min_tokens)",
            ],
            "top_k, repetition_penalty, min_new_tokens (not taken by ollama)",
        ),
    ],
)
def test_each_kind_is_sent_the_parameters_it_takes_and_told_once_of_the_others(owned_by, sent, notices, dropped):
    server = Server(owned_by)
    server.routes["/props"] = (200, {"default_generation_settings": {"n_ctx": 4096}})
    engine = server.engine()
    first, _ = run(engine, ask(conversation("hi"), ALL_CHOSEN))
    second, _ = run(engine, ask(conversation("hi"), ALL_CHOSEN))
    assert [body_params(body) for body in server.posts] == [sent, sent]
    assert server.posts[0]["stream_options"] == {"include_usage": True}
    assert (first.notices, second.notices) == (notices, [])
    rows = {row.name: row.value for row in engine.status()}
    assert rows["sent"] == ", ".join(f"{k}={v}" for k, v in sent.items())
    assert rows.get("dropped") == dropped


def test_transformers_serve_takes_the_others_in_generation_config():
    server = Server("Qwen", status={"value": "loaded"})  # transformers serve: owned_by is the model's organisation
    engine = server.engine()
    assert engine.kind == "transformers"
    run(engine, ask(conversation("hi"), ALL_CHOSEN))
    run(engine, ask(conversation("hi"), ("top_k",)))
    assert server.posts[0] == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "generation_config": json.dumps({"top_k": 20, "repetition_penalty": 1.1, "min_new_tokens": 2}),
    }
    # Without max_tokens the server would skip its floor of 1024 new tokens: it goes along.
    assert body_params(server.posts[1]) == {"generation_config": json.dumps({"top_k": 20, "max_new_tokens": 1024})}


def test_only_the_parameters_the_user_chose_are_sent():
    server = Server("vllm")
    engine = server.engine()
    assert {row.name: row.value for row in engine.status()}["sent"] == "(nothing sent yet)"
    run(engine, ask(conversation("hi"), ("temperature",)))
    run(engine, ask(conversation("hi"), ("top_k",), params=PARAMS.replace(top_k=0)))
    run(engine, ask(conversation("hi")))
    assert [body_params(body) for body in server.posts] == [{"temperature": 0.5}, {"top_k": -1}, {}]
    assert {row.name: row.value for row in engine.status()}["sent"] == "(none: the server's defaults)"


def test_an_unknown_kind_is_sent_the_common_parameters_only():
    server = Server("someone")
    engine = server.engine()
    assert (engine.kind, engine.describe()) == ("openai", f"remote OpenAI-compatible server at {BASE}")
    reply, _ = run(engine, ask(conversation("hi"), ("top_k", "temperature")))
    assert body_params(server.posts[0]) == {"temperature": 0.5}
    assert reply.notices == ["(top_k not sent: chat cannot tell whether this server takes top_k)"]


# ---- connecting: kinds, context lengths, models ----


def test_the_kind_and_context_length_from_the_models_entry():
    engine = Server("vllm", max_model_len=8192).engine()
    assert (engine.name, engine.model, engine.kind, engine.context_length) == ("remote", MODEL, "vllm", 8192)
    assert engine.describe() == f"remote vLLM at {BASE}"
    assert engine.origin() == {"model": MODEL, "backend": "remote", "base_url": BASE}


@pytest.mark.parametrize(
    ("route", "answer", "kind", "context_length"),
    [
        ("/props", {"default_generation_settings": {"n_ctx": 2048}}, "llamacpp", 2048),
        ("/props", {"n_ctx": 1024, "build_info": "b1"}, "llamacpp", 1024),
        ("/api/version", {"version": "0.6.2"}, "ollama", None),
        ("/get_server_info", {"version": "0.4", "model_path": "m"}, "sglang", None),
        ("/version", {"version": "0.9.1"}, "vllm", None),
        ("/nothing", {}, "openai", None),
    ],
)
def test_a_server_whose_owner_says_nothing_is_probed_at_its_root(route, answer, kind, context_length):
    server = Server("proxy")
    server.routes[route] = (200, answer)
    engine = server.engine()
    assert (engine.kind, engine.context_length) == (kind, context_length)
    assert all(
        r.url.path in ("/v1/models", "/props", "/api/version", "/get_server_info", "/version") for r in server.requests
    )


def test_llama_server_reads_its_context_from_props():
    server = Server("llamacpp")
    server.routes["/props"] = (200, {"default_generation_settings": {"n_ctx": 4096}})
    assert server.engine().context_length == 4096


def test_the_one_served_model_is_taken_and_a_named_one_must_be_served():
    assert Server("vllm").engine().model == MODEL
    assert Server("vllm").engine(model=MODEL).model == MODEL
    ollama = Server(entries=[{"id": "llama3.2:latest", "owned_by": "library"}])
    assert ollama.engine(model="llama3.2").model == "llama3.2:latest"
    with pytest.raises(ChatError) as why:
        Server(entries=[{"id": "a"}, {"id": "b"}]).engine(model="c")
    assert str(why.value) == f"{BASE} does not serve c; it serves a, b"


def test_several_models_and_none_named_is_a_usage_error():
    with pytest.raises(UsageError) as why:
        Server(entries=[{"id": "a"}, {"id": "b"}]).engine()
    assert str(why.value) == f"{BASE} serves 2 models (a, b); name one: chat --base-url {BASE} ID"


def test_no_model_served():
    with pytest.raises(ChatError) as why:
        Server(entries=[]).engine()
    assert str(why.value) == f"{BASE} serves no model (its /models list is empty); load one into the server first"


def test_a_404_on_models_suggests_the_v1_suffix():
    server = Server("vllm")
    with pytest.raises(ChatError) as why:
        server.engine(base="http://127.0.0.1:8000/")
    assert str(why.value) == (
        "http://127.0.0.1:8000/models answered 404, so this is not the base of an OpenAI API; "
        "the API's base usually ends in /v1: chat --base-url http://127.0.0.1:8000/v1"
    )


def test_offline_allows_only_this_machine():
    with pytest.raises(UsageError) as why:
        Server("vllm").engine(base="http://gpu-box.example:8000/v1", offline=True)
    assert str(why.value).startswith("--offline allows only a server on this machine (")
    assert "gpu-box.example" in str(why.value)
    for base in ("http://localhost:8000/v1", "http://127.0.0.5:8000/v1", "http://[::1]:8000/v1"):
        assert Server("vllm").engine(base=base, offline=True).model == MODEL


def test_the_url_is_shown_without_its_password_and_the_key_never():
    server = Server("vllm")
    engine = server.engine(base="http://me:hunter2@127.0.0.1:8000/v1/", api_key=KEY)
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the key wins over the URL's password
    assert server.requests[0].url == f"{BASE}/models"
    shown = [engine.describe(), *(f"{row.name} {row.value}" for row in engine.status()), json.dumps(engine.origin())]
    assert engine.describe() == f"remote vLLM at {BASE}"
    assert not any(secret in line for line in shown for secret in (KEY, "hunter2", "me:"))
    proxied = Server("vllm")
    proxied.engine(base="http://me:hunter2@127.0.0.1:8000/v1/")
    assert proxied.requests[0].headers["authorization"] == "Basic bWU6aHVudGVyMg=="  # a proxy's basic auth


# ---- failures ----


@pytest.mark.parametrize(
    ("status", "body", "key", "line"),
    [
        (
            401,
            {"error": {"message": "Unauthorized"}},
            None,
            f"the server at {BASE} wants an API key: put it in a file and pass --api-key-file FILE, "
            "or set $CHAT_API_KEY",
        ),
        (
            401,
            {"error": {"message": f"invalid key {KEY}"}},
            KEY,
            f"the server at {BASE} refused the API key (401: invalid key ***)",
        ),
        (403, {"error": "forbidden"}, KEY, f"the server at {BASE} refused the API key (403: forbidden)"),
        (
            404,
            {"object": "error", "message": f"The model `{MODEL}` does not exist.", "type": "NotFoundError"},
            None,
            f"the server at {BASE} does not know the model {MODEL} (404: The model `{MODEL}` does not exist.); "
            f"{BASE}/models lists them",
        ),
        (
            400,
            {"error": {"message": "temperature must be non-negative"}},
            None,
            f"the server at {BASE} refused the request (400: temperature must be non-negative)",
        ),
        (
            422,
            {"detail": [{"loc": ["body", "top_k"], "msg": "Extra inputs are not permitted"}, {"msg": "bad seed"}]},
            None,
            f"the server at {BASE} refused the request (422: Extra inputs are not permitted; bad seed)",
        ),
        (
            429,
            {"message": "rate limited"},
            None,
            f"the server at {BASE} is busy (429: rate limited); try again in a moment",
        ),
        (503, "Service Unavailable", None, f"the server at {BASE} failed (503: Service Unavailable)"),
        (500, {"detail": "boom"}, None, f"the server at {BASE} failed (500: boom)"),
    ],
)
def test_each_error_status_is_one_line(status, body, key, line):
    server = Server("vllm", (status, body))
    engine = server.engine(api_key=key)
    talk = conversation("hi")
    reply = engine.reply(ask(talk))
    with pytest.raises(ChatError) as why:
        reply.start()
    assert str(why.value) == line
    assert KEY not in str(why.value)
    assert not any(KEY in row.value for row in engine.status())
    assert reply.request.signals.blocking is False and talk.context_start == 0


def test_a_refused_key_on_models_is_said_at_connect():
    with pytest.raises(ChatError) as why:
        connect(BASE, None, KEY, transport=httpx2.MockTransport(lambda r: httpx2.Response(401, text=f"bad {KEY}")))
    assert str(why.value) == f"the server at {BASE} refused the API key (401: bad ***)"


def test_a_long_message_is_cut_to_one_short_line():
    server = Server("vllm", (500, {"detail": "word\n" * 200}))
    reply = server.engine().reply(ask(conversation("hi")))
    with pytest.raises(ChatError) as why:
        reply.start()
    said = str(why.value).removeprefix(f"the server at {BASE} failed (500: ").removesuffix(")")
    assert "\n" not in said and len(said) == 300 and said.endswith("...")


def raising(error: Exception) -> Callable[[httpx2.Request], httpx2.Response]:
    def handler(request: httpx2.Request) -> httpx2.Response:
        raise error

    return handler


def chained(error: httpx2.HTTPError, cause: BaseException) -> httpx2.HTTPError:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (
            chained(httpx2.ConnectError("[Errno 111] Connection refused"), ConnectionRefusedError(111, "refused")),
            f"nothing answers at {BASE}: start the server (docs/remote.md) or check --base-url",
        ),
        (
            chained(httpx2.ConnectError("[Errno -2] Name or service not known"), socket.gaierror(-2, "unknown")),
            f"cannot find the host 127.0.0.1 ({BASE}); check --base-url",
        ),
        (httpx2.ConnectTimeout("timed out"), f"{BASE} did not answer within 10 s; check --base-url and the server"),
        (httpx2.ReadTimeout("timed out"), f"the server at {BASE} sent nothing for 600 s; it may be overloaded"),
    ],
)
def test_connection_failures_are_one_line(error, line):
    with pytest.raises(ChatError) as why:
        connect(BASE, None, None, transport=httpx2.MockTransport(raising(error)))
    assert str(why.value) == line
    server = Server("vllm", raising(error))
    reply = server.engine().reply(ask(conversation("hi")))
    with pytest.raises(ChatError) as why:
        reply.start()
    assert str(why.value) == line


def test_nothing_listening_on_a_real_port_is_said_quickly():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(ChatError) as why:
        connect(f"http://127.0.0.1:{port}/v1", None, None)
    assert str(why.value) == (
        f"nothing answers at http://127.0.0.1:{port}/v1: start the server (docs/remote.md) or check --base-url"
    )
    assert time.perf_counter() - started < 5


# ---- the context ----

OVERFLOW = (
    400,
    {
        "object": "error",
        "message": "This model's maximum context length is 64 tokens. However, you requested 90 tokens.",
        "type": "BadRequestError",
    },
)


def test_an_overflow_drops_the_oldest_exchange_and_asks_again():
    server = Server("vllm", OVERFLOW, sse(chunk("ok")))
    talk = conversation("one", "1", "two", "2", "three")
    reply, pieces = run(server.engine(), ask(talk))
    assert (pieces, reply.dropped, talk.context_start) == (["ok"], 1, 2)
    assert [[m["content"] for m in body["messages"]] for body in server.posts] == [
        ["one", "1", "two", "2", "three"],
        ["two", "2", "three"],
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": 400, "message": "the request exceeds the available context size", "type": "x"}},
        {"error": {"code": 400, "message": "x", "type": "exceed_context_size_error"}},
        {"object": "error", "message": "The input (9000 tokens) is longer than the model's context length (4096)."},
        {"error": {"message": "prompt has too many tokens"}},
    ],
)
def test_each_servers_overflow_is_known(body):
    server = Server("vllm", (400, body), sse(chunk("ok")))
    talk = conversation("one", "1", "two")
    reply, _ = run(server.engine(), ask(talk))
    assert (reply.dropped, talk.context_start, len(server.posts)) == (1, 2, 2)


def test_drop_oldest_stops_after_three_resends_and_changes_nothing():
    server = Server("vllm", OVERFLOW)
    talk = conversation("a", "1", "b", "2", "c", "3", "d", "4", "e", "5", "f")
    reply = server.engine().reply(ask(talk, ("max_new_tokens",)))
    with pytest.raises(ChatError) as why:
        reply.start()
    assert str(why.value) == (
        "the conversation is over the server's context even without its 3 oldest exchanges "
        f"({OVERFLOW[1]['message']}); use !undo or !clear, or lower max_new_tokens"
    )
    assert [body["messages"][0]["content"] for body in server.posts] == ["a", "b", "c", "d"]
    assert talk.context_start == 0 and reply.request.signals.blocking is False


def test_an_overflow_with_policy_error_says_how_to_make_room():
    server = Server("vllm", OVERFLOW)
    talk = conversation("one", "1", "two")
    with pytest.raises(ChatError) as why:
        run(server.engine(), ask(talk, policy="error"))
    assert str(why.value) == (
        f"the server's context is full ({OVERFLOW[1]['message']}); use !undo or !clear, "
        "or run with --context-policy drop-oldest"
    )
    assert len(server.posts) == 1 and talk.context_start == 0


def test_the_newest_message_alone_over_the_context_is_refused():
    server = Server("vllm", OVERFLOW)
    talk = conversation("one", "1", "huge")
    with pytest.raises(ChatError) as why:
        run(server.engine(), ask(talk))  # drop-oldest drops "one" and "1", and then has nothing to drop
    assert str(why.value) == f"this message is over the server's context ({OVERFLOW[1]['message']}); shorten it"
    assert (len(server.posts), talk.context_start) == (2, 0)
    with pytest.raises(ChatError) as why:
        run(server.engine(), ask(conversation("huge", system="be brief"), ("max_new_tokens",)))
    assert str(why.value) == (
        f"this message is over the server's context ({OVERFLOW[1]['message']}); shorten it or the system prompt, "
        "or lower max_new_tokens"
    )


def test_the_last_usage_trims_the_oldest_exchanges_before_sending():
    # 1 token a character, as the first reply's prompt was counted: 100 characters + 12 for the message.
    server = Server("vllm", sse(chunk("b" * 100), usage(112, 100)), sse(chunk("ok"), usage(40, 2)), max_model_len=100)
    engine = server.engine()
    talk = conversation("a" * 100)
    first, _ = run(engine, ask(talk))
    assert (first.dropped, engine.context_tokens(talk)) == (0, 212)
    talk.add("assistant", first.text)
    talk.add("user", "c" * 20)  # 32 "tokens" with the 50 of max_new_tokens fit; the whole chat (256) does not
    second, pieces = run(engine, ask(talk, ("max_new_tokens",), params=PARAMS.replace(max_new_tokens=50)))
    assert (pieces, second.dropped, talk.context_start, len(server.posts)) == (["ok"], 1, 2, 2)
    assert server.posts[1]["messages"] == [{"role": "user", "content": "c" * 20}]


@pytest.mark.parametrize(("context", "policy"), [({}, "drop-oldest"), ({"max_model_len": 100}, "error")])
def test_no_trim_without_a_context_length_or_with_policy_error(context, policy):
    # Without a length there is nothing to fit to; with policy error the server decides (here it answers).
    server = Server("vllm", sse(chunk("x" * 500), usage(112, 500)), **context)
    engine = server.engine()
    talk = conversation("a" * 100)
    first, _ = run(engine, ask(talk))
    talk.add("assistant", first.text)
    talk.add("user", "c" * 20)
    second, _ = run(engine, ask(talk, policy=policy))
    assert (second.dropped, talk.context_start, len(server.posts[1]["messages"])) == (0, 0, 3)
