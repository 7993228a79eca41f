"""The remote engine: the replies come from an OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server,
ollama, `transformers serve`), streamed over HTTP from its /chat/completions.

Nothing here imports torch or transformers: a remote chat starts in a fraction of a second. The server applies
its model's chat template and its own defaults; chat sends only the parameters the user set, under the names
the server's kind knows (PARAMETERS), and never prints the API key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpx2

from chat.conversation import Conversation
from chat.engine import Reasoning, ReplyRequest, ReplyStats, Row
from chat.errors import ChatError, UsageError

# Server kinds by the `owned_by` of their /models entries. transformers serve writes the model's Hub
# organisation there instead, or "local" for a path (see kind_of).
OWNERS = {
    "vllm": "vllm",
    "sglang": "sglang",
    "llamacpp": "llamacpp",
    "library": "ollama",  # ollama's own models; a user's are owned by their namespace (the probe finds those)
    "ollama": "ollama",
}
NAMES = {
    "vllm": "vLLM",
    "sglang": "SGLang",
    "llamacpp": "llama-server",
    "ollama": "ollama",
    "transformers": "transformers serve",
    "openai": "OpenAI-compatible server",
}
# Where at the server's root each kind answers and what its answer holds: a cheap way to tell a server whose
# owned_by says nothing. SGLang before vLLM: both may answer /version.
PROBES = (
    ("llamacpp", "/props", ("default_generation_settings", "n_ctx")),
    ("ollama", "/api/version", ("version",)),
    ("sglang", "/get_server_info", ("version", "model_path", "tokenizer_path")),
    ("vllm", "/version", ("version",)),
)
PROBE_TIMEOUT = httpx2.Timeout(2.0)
CONNECT_TIMEOUT_S = 10.0

# Our parameter -> its name on the wire, by server kind; a kind missing from a row takes no such parameter
# (it is not sent, and said once). A "generation_config." name goes inside transformers serve's
# generation_config field (see generation_config), which takes GenerationConfig's names.
ALL_KINDS = tuple(NAMES)
PARAMETERS: dict[str, dict[str, str]] = {
    "max_new_tokens": dict.fromkeys(ALL_KINDS, "max_tokens"),
    "temperature": dict.fromkeys(ALL_KINDS, "temperature"),
    "top_p": dict.fromkeys(ALL_KINDS, "top_p"),
    "seed": dict.fromkeys(ALL_KINDS, "seed"),
    "top_k": {
        "vllm": "top_k",
        "sglang": "top_k",
        "llamacpp": "top_k",
        "transformers": "generation_config.top_k",
    },
    "repetition_penalty": {
        "vllm": "repetition_penalty",
        "sglang": "repetition_penalty",
        "llamacpp": "repeat_penalty",
        "transformers": "generation_config.repetition_penalty",
    },
    "min_new_tokens": {
        "vllm": "min_tokens",
        "sglang": "min_tokens",
        "transformers": "generation_config.min_new_tokens",
    },
}
# The usual name of a parameter on a server, for the notice that one was not sent.
USUAL_NAME = {"top_k": "top_k", "repetition_penalty": "repetition_penalty", "min_new_tokens": "min_tokens"}
# Kinds that do not take "stream_options" (transformers serve ignores it, with a warning in its log).
NO_STREAM_OPTIONS = {"transformers"}

FINISH = {"stop": "eos", "length": "length"}  # a server's finish_reason -> ours; any other reason ends as "eos"
OVERFLOW = (
    "maximum context length",  # vLLM
    "exceed_context_size_error",  # llama-server's error type
    "exceeds the available context size",  # llama-server
    "longer than the model's context length",  # SGLang
    "context length",
    "context window",
    "context size",
    "too many tokens",
)
OVERFLOW_RESENDS = 3
MESSAGE_LIMIT = 300
MAX_LISTED = 10


def connect(
    base_url: str,
    model: str | None,
    api_key: str | None,
    *,
    offline: bool = False,
    transport: httpx2.BaseTransport | None = None,
    timeout_s: float = 600.0,
) -> RemoteEngine:
    """The engine for `model` (None: the one the server serves) at the API base `base_url` (like
    http://127.0.0.1:8000/v1). Raises UsageError or ChatError, in one line, when it cannot be used."""
    base = base_url.strip().rstrip("/")
    try:
        url = httpx2.URL(base)
    except httpx2.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"--base-url must be an http:// or https:// URL like http://127.0.0.1:8000/v1, not '{base}'")
    shown = str(url.copy_with(userinfo=b"")).rstrip("/")  # no user:password, ever
    if offline and not is_loopback(url.host):
        raise UsageError(
            f"--offline allows only a server on this machine (localhost, 127.0.0.1 or ::1), not {url.host}; "
            "drop --offline to use it"
        )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A user:password in the URL is the basic auth of a proxy in front, unless a key takes the header.
    auth = httpx2.BasicAuth(url.username, url.password) if url.userinfo and not api_key else None
    # retries: only connection attempts are retried (a POST once sent never is).
    client = httpx2.Client(
        transport=transport or httpx2.HTTPTransport(retries=2),
        headers=headers,
        auth=auth,
        timeout=httpx2.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
    )
    try:
        server = Server(client, shown, api_key, timeout_s)
        entries = server.models()
        entry = pick_model(entries, model, shown)
        kind, props = kind_of(server, entry)
        context_length = context_length_of(server, kind, entry, props)
    except BaseException:
        client.close()
        raise
    return RemoteEngine(server, entry["id"], kind, context_length)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server:
    """The HTTP side: one client, the URLs, and every failure turned into one line naming the shown URL."""

    def __init__(self, client: httpx2.Client, base: str, api_key: str | None, timeout_s: float):
        self.client = client
        self.base = self.shown = base  # without user:password (the client has them as auth)
        self.root = base[: -len("/v1")] if base.endswith("/v1") else base  # where servers keep their own routes
        self.api_key = api_key
        self.timeout_s = timeout_s

    def models(self) -> list[dict[str, Any]]:
        try:
            response = self.client.get(f"{self.base}/models")
        except httpx2.HTTPError as why:
            raise self.transport_error(why) from None
        if response.status_code == 404:
            hint = (
                "check --base-url (the API's base, like http://127.0.0.1:8000/v1)"
                if self.shown.endswith("/v1")
                else f"the API's base usually ends in /v1: chat --base-url {self.shown}/v1"
            )
            raise ChatError(f"{self.shown}/models answered 404, so this is not the base of an OpenAI API; {hint}")
        if response.status_code != 200:
            raise self.status_error(response.status_code, self.answer(response)[0], None)
        try:
            data = response.json()
        except ValueError:
            data = None
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ChatError(
                f"{self.shown}/models did not answer with a list of models; is it an OpenAI-compatible server?"
            )
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str) and e["id"]]

    def probe(self, path: str) -> dict[str, Any] | None:
        """GET a route at the server's root, quickly; None on any failure."""
        with contextlib.suppress(httpx2.HTTPError, ValueError):
            response = self.client.get(f"{self.root}{path}", timeout=PROBE_TIMEOUT)
            if response.status_code == 200:
                data = response.json()
                return data if isinstance(data, dict) else None
        return None

    def post_stream(self, body: dict[str, Any]) -> httpx2.Response:
        """POST to chat/completions and wait for the status line; the body is then read as it streams."""
        request = self.client.build_request("POST", f"{self.base}/chat/completions", json=body)
        try:
            return self.client.send(request, stream=True)
        except httpx2.HTTPError as why:
            raise self.transport_error(why) from None

    def answer(self, response: httpx2.Response) -> tuple[str, str]:
        """The server's own words from an error response, in one line, and the whole body."""
        try:
            response.read()
        except httpx2.HTTPError:
            return "", ""
        finally:
            response.close()
        try:
            said = message_of(response.json())
        except ValueError:
            said = None
        return self.scrub(one_line(said or response.text)), response.text

    def scrub(self, text: str) -> str:
        """A server may quote the key it refused: the key is never shown."""
        return text.replace(self.api_key, "***") if self.api_key else text

    def transport_error(self, why: httpx2.HTTPError) -> ChatError:
        url = self.shown
        if isinstance(why, httpx2.ConnectTimeout):
            return ChatError(f"{url} did not answer within {CONNECT_TIMEOUT_S:g} s; check --base-url and the server")
        if isinstance(why, (httpx2.ReadTimeout, httpx2.WriteTimeout, httpx2.PoolTimeout)):
            return ChatError(f"the server at {url} sent nothing for {self.timeout_s:g} s; it may be overloaded")
        if isinstance(why, httpx2.ConnectError):
            causes = list(causes_of(why))
            text = " ".join(str(c) for c in causes).lower()
            if any(isinstance(c, socket.gaierror) for c in causes) or "name or service" in text or "nodename" in text:
                host = httpx2.URL(url).host
                return ChatError(f"cannot find the host {host} ({url}); check --base-url")
            if any(isinstance(c, ConnectionRefusedError) for c in causes) or "refused" in text:
                return ChatError(f"nothing answers at {url}: start the server (docs/remote.md) or check --base-url")
            if "ssl" in text or "certificate" in text:
                return ChatError(f"cannot make a secure connection to {url} ({one_line(str(why))})")
            return ChatError(f"cannot connect to {url} ({one_line(str(why)) or type(why).__name__})")
        if isinstance(why, httpx2.UnsupportedProtocol):
            return UsageError(f"--base-url must be an http:// or https:// URL like http://127.0.0.1:8000/v1 ({why})")
        return ChatError(f"the connection to {url} failed ({one_line(str(why)) or type(why).__name__})")

    def status_error(self, status: int, said: str, model: str | None) -> ChatError:
        url, detail = self.shown, f"{status}: {said}" if said else str(status)
        if status in (401, 403):
            if not self.api_key:
                return ChatError(
                    f"the server at {url} wants an API key: put it in a file and pass --api-key-file FILE, "
                    "or set $CHAT_API_KEY"
                )
            return ChatError(f"the server at {url} refused the API key ({detail})")
        if status == 404 and model is not None and "model" in said.lower():
            return ChatError(f"the server at {url} does not know the model {model} ({detail}); {url}/models lists them")
        if status == 404:
            return ChatError(f"{url}/chat/completions answered {detail}; check --base-url")
        if status in (400, 422):
            return ChatError(f"the server at {url} refused the request ({detail})")
        if status == 429:
            return ChatError(f"the server at {url} is busy ({detail}); try again in a moment")
        if status >= 500:
            return ChatError(f"the server at {url} failed ({detail})")
        return ChatError(f"the server at {url} answered {detail}")


def causes_of(error: BaseException) -> Iterator[BaseException]:
    """The error and what it was raised from (httpx2 wraps the socket's own error twice)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def message_of(data: Any) -> str | None:
    """The message in an error body: {"error": {"message"}}, {"error": "..."}, {"detail": ...} (FastAPI's 422
    detail is a list of {"msg"}), {"message"}."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    detail = data.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    if isinstance(data.get("message"), str):
        return data["message"]
    return None


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pick_model(entries: list[dict[str, Any]], model: str | None, shown: str) -> dict[str, Any]:
    ids = [e["id"] for e in entries]
    listed = ", ".join(ids[:MAX_LISTED]) + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")
    if not ids:
        raise ChatError(f"{shown} serves no model (its /models list is empty); load one into the server first")
    if model is None:
        if len(ids) > 1:
            raise UsageError(f"{shown} serves {len(ids)} models ({listed}); name one: chat --base-url {shown} ID")
        return entries[0]
    for wanted in (model, f"{model}:latest"):  # ollama's models answer to their name without the tag
        for entry in entries:
            if entry["id"] == wanted:
                return entry
    raise ChatError(f"{shown} does not serve {model}; it serves {listed}")


def kind_of(server: Server, entry: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The server's kind (a key of NAMES), and llama-server's /props when it was read on the way."""
    owner = entry.get("owned_by")
    kind = OWNERS.get(owner.lower()) if isinstance(owner, str) else None
    if kind == "llamacpp":
        return kind, server.probe("/props")
    if kind is not None:
        return kind, None
    # transformers serve names the model's organisation as owner and adds a "status" no other kind does.
    status = entry.get("status")
    if isinstance(status, dict) and "value" in status:
        return "transformers", None
    for kind, path, keys in PROBES:
        answer = server.probe(path)
        if answer is not None and any(key in answer for key in keys):
            return kind, answer if kind == "llamacpp" else None
    return "openai", None


def context_length_of(server: Server, kind: str, entry: dict[str, Any], props: dict[str, Any] | None) -> int | None:
    """Most tokens of prompt and reply, where the server says: vLLM's and SGLang's max_model_len, llama-server's
    n_ctx; None otherwise (ollama and transformers serve do not say)."""
    value: Any = None
    if kind in ("vllm", "sglang"):
        value = entry.get("max_model_len")
    elif kind == "llamacpp" and props is not None:
        settings = props.get("default_generation_settings")
        value = settings.get("n_ctx") if isinstance(settings, dict) else None
        value = props.get("n_ctx") if value is None else value
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def generation_config(values: dict[str, Any], max_tokens_sent: bool) -> str:
    """transformers serve's generation_config field: GenerationConfig's keys as a JSON string.

    It replaces the model's generation config in the server's hands, which then skips its own floor of 1024
    max_new_tokens (a reply would stop at GenerationConfig's max_length of 20): that floor goes along unless
    max_tokens is sent. A JSON object there, rather than a string, is a 500."""
    config = dict(values)
    if not max_tokens_sent:
        config.setdefault("max_new_tokens", 1024)
    return json.dumps(config)


def wire_value(name: str, kind: str, value: Any) -> Any:
    if name == "top_k" and value == 0 and kind in ("vllm", "sglang"):
        return -1  # their "all tokens" (SGLang refuses 0)
    return value


def size(messages: list[dict[str, str]]) -> int:
    """Characters of the messages, with a few for each message's place in the chat template: what the
    tokens per character of the last reply's prompt are counted against."""
    return sum(len(m["content"]) + 12 for m in messages)


def is_overflow(status: int, text: str) -> bool:
    lowered = text.lower()
    return status in (400, 413) and any(words in lowered for words in OVERFLOW)


class RemoteEngine:
    """chat.engine.Engine for a model an OpenAI-compatible server runs."""

    name = "remote"

    def __init__(self, server: Server, model: str, kind: str, context_length: int | None):
        self.server = server
        self.model = model
        self.kind = kind
        self.context_length = context_length
        self.notes: list[str] = []
        self.sent: list[str] | None = None  # "wire_name=value" of the last request; None before the first
        self.not_sent: list[str] = []  # the user's parameters the last request left out
        self._said: set[str] = set()  # parameters whose leaving out was said once already
        self._usage: tuple[int, int, int] | None = None  # the last reply's prompt tokens, its characters, reply tokens
        self._current: RemoteReply | None = None

    @property
    def shown_url(self) -> str:
        return self.server.shown

    def recommended(self) -> dict[str, Any]:
        return {}  # the server applies the model's generation_config itself

    def reply(self, request: ReplyRequest) -> RemoteReply:
        if self._current is not None:
            self._current.close()
        self._current = RemoteReply(self, request)
        return self._current

    def warm_up(self, conversation: Conversation) -> None:
        """Nothing to warm: the server keeps its model loaded."""

    def context_tokens(self, conversation: Conversation) -> int | None:
        if self._usage is None:
            return None
        prompt, _, reply = self._usage
        return prompt + reply

    def reseed(self, seed: int | None) -> None:
        """Nothing: a seed the user set is sent with each request."""

    def settle_thread(self) -> None:
        """Nothing: no torch threads here."""

    def describe(self) -> str:
        return f"remote {NAMES[self.kind]} at {self.shown_url}"

    def status(self) -> list[Row]:
        if self.sent is None:
            sent = "(nothing sent yet)"
        else:
            sent = ", ".join(self.sent) or "(none: the server's defaults)"
        rows = [
            Row("server", f"{self.shown_url} ({NAMES[self.kind]})"),
            Row("model", self.model),
            Row("sent", sent),
        ]
        if self.not_sent:
            rows.append(Row("dropped", f"{', '.join(self.not_sent)} (not taken by {NAMES[self.kind]})"))
        return rows

    def origin(self) -> dict[str, Any]:
        return {"model": self.model, "backend": "remote", "base_url": self.shown_url}

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        self.server.client.close()

    def parameters(self, request: ReplyRequest) -> tuple[dict[str, Any], list[str]]:
        """The body's fields for the parameters the user set, and notices of those the server cannot take."""
        fields: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        notices: list[str] = []
        self.not_sent = []
        for name in PARAMETERS:
            if name not in request.chosen:
                continue
            wire = PARAMETERS[name].get(self.kind)
            if wire is None:
                self.not_sent.append(name)
                if name not in self._said:
                    self._said.add(name)
                    notices.append(self.not_taken(name))
                continue
            value = wire_value(name, self.kind, getattr(request.params, name))
            if wire.startswith("generation_config."):
                nested[wire.removeprefix("generation_config.")] = value
            else:
                fields[wire] = value
        self.sent = [f"{key}={value}" for key, value in fields.items()]
        if nested:
            fields["generation_config"] = generation_config(nested, "max_tokens" in fields)
            self.sent += [f"generation_config.{k}={v}" for k, v in json.loads(fields["generation_config"]).items()]
        return fields, notices

    def not_taken(self, name: str) -> str:
        usual = USUAL_NAME.get(name, name)
        if self.kind == "openai":
            return f"({name} not sent: chat cannot tell whether this server takes {usual})"
        return f"({name} not sent: {NAMES[self.kind]} takes no {usual})"

    def fitting_start(self, conversation: Conversation, starts: list[int], request: ReplyRequest) -> int:
        """The index into starts of the most history that fits, by the tokens per character of the last prompt
        the server counted (0 when it never said, or the context length is unknown: its error then tells)."""
        if self.context_length is None or self._usage is None or self._usage[1] == 0:
            return 0
        prompt_tokens, chars, _ = self._usage
        room = self.context_length - (request.params.max_new_tokens if "max_new_tokens" in request.chosen else 0)
        for index, start in enumerate(starts):
            if size(conversation.in_context(start)) * prompt_tokens / chars <= room:
                return index
        return len(starts) - 1  # the newest message alone: the server says whether it fits


class RemoteReply:
    """chat.engine.Reply streamed from the server. A failure mid-stream ends it with finish "error" and the
    server's words in `error`; the text so far stays."""

    def __init__(self, engine: RemoteEngine, request: ReplyRequest):
        self.engine = engine
        self.request = request
        self.text = ""
        self.finish = ""
        self.stats = ReplyStats()
        self.dropped = 0
        self.room: int | None = None
        self.notices: list[str] = []
        self.error: str | None = None
        self._response: httpx2.Response | None = None
        self._chars = 0
        self._sent_at = 0.0
        self._first_at: float | None = None
        self._pieces_seen = 0  # pieces of text or reasoning: the reply's tokens when the server gives no usage
        self._usage: dict[str, Any] = {}

    def start(self) -> None:
        engine, request = self.engine, self.request
        conversation = request.conversation
        original = conversation.context_start
        starts = conversation.context_starts()
        fields, self.notices = engine.parameters(request)
        index = engine.fitting_start(conversation, starts, request) if request.policy == "drop-oldest" else 0
        resends = 0
        request.signals.blocking = True  # a Ctrl+C now interrupts the socket read at once
        try:
            while True:
                conversation.context_start = starts[index]
                messages = conversation.in_context()
                body: dict[str, Any] = {"model": engine.model, "messages": messages, "stream": True, **fields}
                if engine.kind not in NO_STREAM_OPTIONS:
                    body["stream_options"] = {"include_usage": True}
                self._sent_at = time.perf_counter()
                response = engine.server.post_stream(body)
                if response.status_code == 200:
                    break
                said, whole = engine.server.answer(response)
                if not is_overflow(response.status_code, whole):
                    raise engine.server.status_error(response.status_code, said, engine.model)
                if index == len(starts) - 1:
                    raise ChatError(f"this message is over the server's context ({said}); shorten it" + self._also())
                if request.policy != "drop-oldest":
                    raise ChatError(
                        f"the server's context is full ({said}); use !undo or !clear"
                        + (", lower max_new_tokens," if "max_new_tokens" in request.chosen else ",")
                        + " or run with --context-policy drop-oldest"
                    )
                if resends == OVERFLOW_RESENDS:
                    raise ChatError(
                        f"the conversation is over the server's context even without its {index} oldest exchanges "
                        f"({said}); use !undo or !clear"
                        + (", or lower max_new_tokens" if "max_new_tokens" in request.chosen else "")
                    )
                resends += 1
                index += 1  # drop the oldest exchange still in context, and ask again
        except BaseException:
            conversation.context_start = original  # a failed start changes nothing
            request.signals.blocking = False
            raise
        self.dropped = index
        self._chars = size(messages)
        self._response = response

    def _also(self) -> str:
        system = " or the system prompt" if self.request.conversation.system else ""
        tokens = ", or lower max_new_tokens" if "max_new_tokens" in self.request.chosen else ""
        return system + tokens

    def __iter__(self) -> Iterator[str]:
        response = self._response
        if response is None:
            raise RuntimeError("start() the reply before reading it")
        try:
            yield from self._read(response)
        except KeyboardInterrupt:  # the session keeps the partial reply; the server sees the connection close
            self.finish = "interrupted"
            raise
        finally:
            self.close()
            self.request.signals.blocking = False
            self._settle()

    def _read(self, response: httpx2.Response) -> Iterator[str]:
        reason = None
        try:
            if "event-stream" not in response.headers.get("content-type", "event-stream"):
                lines: Iterable[str] = [json.dumps(self._whole(response))]  # a server that would not stream
            else:
                lines = sse_data(response.iter_bytes())
            for data in lines:
                if data.strip() == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    if "error" in data:  # transformers serve writes {"error": "..."} without escaping
                        self._fail(data)
                        return
                    continue
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk or chunk.get("object") == "error":
                    self._fail(message_of(chunk) or json.dumps(chunk))
                    return
                if isinstance(chunk.get("usage"), dict):
                    self._usage = chunk["usage"]
                choices = chunk.get("choices")
                choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
                delta = choice.get("delta") or choice.get("message") or {}
                if isinstance(delta, dict):
                    yield from self._pieces(delta)
                if choice.get("finish_reason"):
                    reason = choice["finish_reason"]
                if self.request.signals.stop:
                    self.finish = "interrupted"
                    return
        except httpx2.ReadTimeout:
            self._fail(f"the server sent nothing for {self.engine.server.timeout_s:g} s", said=False)
            return
        except httpx2.TransportError as why:  # ReadError, RemoteProtocolError: the connection broke
            self._fail(f"the connection to {self.engine.shown_url} broke mid-reply ({one_line(str(why))})", said=False)
            return
        self.finish = FINISH.get(reason, "eos")

    def _pieces(self, delta: dict[str, Any]) -> Iterator[str]:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        content = delta.get("content")
        for piece, thinking in ((reasoning, True), (content, False)):
            if not isinstance(piece, str) or not piece:
                continue
            if self._first_at is None:
                self._first_at = time.perf_counter()
            self._pieces_seen += 1
            if thinking:
                yield Reasoning(piece)
                continue
            if not self.text:
                piece = piece.lstrip()  # as the local engine: a reply starts at its first visible character
                if not piece:
                    continue
            self.text += piece
            yield piece

    def _whole(self, response: httpx2.Response) -> dict[str, Any]:
        response.read()
        try:
            data = response.json()
        except ValueError:
            return {"error": one_line(response.text) or "an empty answer"}
        return data if isinstance(data, dict) else {}

    def _fail(self, text: str, *, said: bool = True) -> None:
        line = one_line(self.engine.server.scrub(text))
        self.finish = "error"
        self.error = f"the server stopped with an error: {line}" if said else line

    def _settle(self) -> None:
        """The reply's statistics, and what the next reply's context estimate learns from this one."""
        end, usage, stats = time.perf_counter(), self._usage, self.stats
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        stats.prompt_tokens = prompt if isinstance(prompt, int) else 0
        stats.new_tokens = completion if isinstance(completion, int) else self._pieces_seen
        if self._first_at is not None:
            stats.ttft_ms = (self._first_at - self._sent_at) * 1000
            if stats.new_tokens > 1 and end > self._first_at:
                stats.decode_tok_s = (stats.new_tokens - 1) / (end - self._first_at)
        if isinstance(prompt, int) and prompt > 0:
            self.engine._usage = (prompt, self._chars, stats.new_tokens)

    def close(self) -> None:
        """Close the stream: a server stops generating when its client goes."""
        if self._response is not None:
            self._response.close()


def sse_data(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data:` fields of a server-sent event stream, one per line. Lines end at CR, LF or CRLF only
    (iter_lines would also split at U+2028 and U+0085, which a server's JSON may hold unescaped); blank
    lines, `:` comments (keep-alives) and other fields are passed over."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = re.split(rb"\r\n|\r|\n", buffer)  # a CRLF split across chunks makes one blank line more
        yield from _data(lines)
    yield from _data([buffer])


def _data(lines: list[bytes]) -> Iterator[str]:
    for raw in lines:
        field, _, value = raw.decode("utf-8", errors="replace").partition(":")
        if field == "data":
            yield value[1:] if value.startswith(" ") else value
