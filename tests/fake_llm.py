"""A fake LLM provider for tests, speaking the real wire protocols (standard library only).

Two APIs on one threaded HTTP server:

* Anthropic Messages: ``POST /v1/messages`` (JSON, or SSE with ``"stream": true``: message_start,
  content_block_start / ping / content_block_delta (text_delta, input_json_delta) /
  content_block_stop, message_delta with stop_reason + usage, message_stop) and
  ``POST /v1/messages/count_tokens``.
* OpenAI Responses: ``POST /v1/responses`` (JSON, or SSE: response.created, response.in_progress,
  response.output_item.added/done, response.content_part.added/done,
  response.output_text.delta/done, response.function_call_arguments.delta/done (function tools),
  response.custom_tool_call_input.delta/done (freeform tools such as codex's apply_patch),
  response.completed with usage). ``GET /v1/models`` answers both the OpenAI list shape and
  codex's ``{"models": []}`` shape.

Anything else answers 200 ``{}`` and is recorded, so a CLI's start-up calls never break a test.

A test scripts a queue of *turns*. A "main" request (one that offers tools) takes the next turn;
a side request without tools (title generation, quota probe) gets a short text and takes
nothing, unless ``side_requests_take_turns`` is set. A turn is a dict (JSON, so it can travel
over the control channel); build them with the helpers:

    text("done")                       final answer (stop_reason end_turn / completed)
    tool("Bash", command="ls")         a tool call with an explicit name and arguments
    write_file("hello.txt", "X")       resolved per request against the request's tools:
                                         Write (claude) → {file_path, content}
                                         apply_patch (codex) → an Add File patch
                                         otherwise a shell command through run()
    run("cat hello.txt")               resolved: Bash {command} | exec_command {cmd} |
                                         shell_command {command} | shell {command: [bash,-lc,..]}
    calls(run("a"), run("b"))          several tool calls in one turn
    error(401)                         an error answer in the provider's own error shape
    stall(seconds=None)                hold the connection without answering (until stop())

Besides the queue: ``FakeLLM(api_key="k")`` answers 401 to any request whose key differs, and
``fake.mode = "unauthorized" | "stall" | None`` applies to every request.

Recorded requests (``fake.requests()``) are dicts: method, path, headers (lower-case names,
including x-api-key / authorization), body (parsed JSON or None), raw (text), api_key, kind
("anthropic" | "openai" | "other"), turn (the turn it took, resolved, or None).

In-process: ``with FakeLLM() as fake: fake.script([...]); fake.anthropic_url; fake.openai_url``.
Across processes (e.g. in a network namespace): ``python3 -m tests.fake_llm --host H --port P``
prints ``READY <port>`` and serves a control API on the same port, used by
``RemoteFakeLLM(url)``: ``POST /_fake/script {"turns": [...], "replace": bool}``,
``GET /_fake/requests``, ``POST /_fake/reset``, ``POST /_fake/config {"mode", "api_key"}``.
``outside_fake_llm()`` runs that in a fresh netns reachable from sandboxes only through their
normal egress (see its docstring); ``fake_llm_outside`` is the pytest fixture built on it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.server
import json
import os
import re
import secrets
import shlex
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

# --------------------------------------------------------------------------- turn helpers


def text(content: str) -> dict:
    return {"type": "text", "text": content}


def tool(name: str, arguments: dict | None = None, **kwargs: Any) -> dict:
    """A tool call with an explicit tool name (``tool("Bash", command="ls")``)."""
    return {"type": "tool_calls", "calls": [{"name": name, "arguments": {**(arguments or {}), **kwargs}}]}


def write_file(path: str, content: str) -> dict:
    return {"type": "tool_calls", "calls": [{"op": "write_file", "path": path, "content": content}]}


def run(command: str) -> dict:
    return {"type": "tool_calls", "calls": [{"op": "run", "command": command}]}


def calls(*turns: dict) -> dict:
    """Merge several single-call turns into one turn with parallel tool calls."""
    return {"type": "tool_calls", "calls": [c for t in turns for c in t["calls"]]}


def error(status: int = 401, message: str | None = None) -> dict:
    return {"type": "error", "status": status, "message": message}


def stall(seconds: float | None = None) -> dict:
    return {"type": "stall", "seconds": seconds}


# --------------------------------------------------------------------------- tool resolution


def tool_names(body: dict | None) -> list[str]:
    """Names of the tools a request offers (Anthropic and Responses shapes alike)."""
    names = []
    for t in (body or {}).get("tools") or []:
        if not isinstance(t, dict):
            continue
        name = t.get("name") or (t.get("function") or {}).get("name")
        if name:
            names.append(name)
    return names


def _tools_by_name(body: dict | None) -> dict[str, dict]:
    out = {}
    for t in (body or {}).get("tools") or []:
        if isinstance(t, dict):
            name = t.get("name") or (t.get("function") or {}).get("name")
            if name:
                out[name] = t
    return out


def _working_dir(body: dict | None) -> str | None:
    """The CLI's working directory as its system prompt / instructions state it."""
    blob = json.dumps(body or {})
    for pattern in (r"[Ww]orking directory: ([^\\\"<\n]+)", r"<cwd>([^<]+)</cwd>"):
        m = re.search(pattern, blob)
        if m:
            return m.group(1).strip()
    return None


def _run_call(command: str, tools: dict[str, dict]) -> dict:
    if "Bash" in tools:
        return {"name": "Bash", "arguments": {"command": command}}
    if "exec_command" in tools:
        return {"name": "exec_command", "arguments": {"cmd": command}}
    if "shell_command" in tools:
        return {"name": "shell_command", "arguments": {"command": command}}
    if "shell" in tools:
        props = ((tools["shell"].get("parameters") or {}).get("properties") or {}).get("command") or {}
        if props.get("type") == "string":
            return {"name": "shell", "arguments": {"command": command}}
        return {"name": "shell", "arguments": {"command": ["bash", "-lc", command]}}
    raise LookupError(f"no shell-like tool among {sorted(tools)}")


def resolve_call(call: dict, body: dict | None) -> dict:
    """Turn a semantic call (op=run / op=write_file) into {name, arguments | input, custom}."""
    tools = _tools_by_name(body)
    op = call.get("op")
    if op is None:
        t = tools.get(call["name"]) or {}
        if t.get("type") == "custom":  # a freeform tool: its input is a plain string
            args = call["arguments"]
            return {"name": call["name"], "input": args.get("input", "") if isinstance(args, dict) else str(args), "custom": True}
        return {"name": call["name"], "arguments": call["arguments"]}
    if op == "run":
        return _run_call(call["command"], tools)
    if op == "write_file":
        path, content = call["path"], call["content"]
        if "Write" in tools:
            if not path.startswith("/"):
                path = os.path.join(_working_dir(body) or "/", path)
            return {"name": "Write", "arguments": {"file_path": path, "content": content}}
        if "apply_patch" in tools:
            lines = content.split("\n")
            if lines and lines[-1] == "":
                lines = lines[:-1]
            patch = "*** Begin Patch\n*** Add File: " + path + "\n" + "".join("+" + line + "\n" for line in lines) + "*** End Patch\n"
            if tools["apply_patch"].get("type") == "custom":
                return {"name": "apply_patch", "input": patch, "custom": True}
            return {"name": "apply_patch", "arguments": {"input": patch}}
        return _run_call(f"printf %s {shlex.quote(content)} > {shlex.quote(path)}", tools)
    raise ValueError(f"unknown op {op!r}")


# --------------------------------------------------------------------------- the server state


class _State:
    def __init__(self, api_key: str | None = None):
        self.lock = threading.Lock()
        self.turns: list[dict] = []
        self.requests: list[dict] = []
        self.api_key = api_key
        self.mode: str | None = None
        self.side_requests_take_turns = False
        self.stopping = threading.Event()
        self.ids = 0

    def next_id(self, prefix: str) -> str:
        with self.lock:
            self.ids += 1
            return f"{prefix}_{self.ids:04d}{secrets.token_hex(6)}"


def _key_of(headers: dict[str, str]) -> str | None:
    if "x-api-key" in headers:
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-llm/1"
    state: _State  # set on the subclass

    def log_message(self, format, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, obj: Any, extra: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", self.state.next_id("req"))
        self.send_header("x-request-id", self.state.next_id("req"))
        self.end_headers()

    def _sse(self, event: str, data: dict) -> None:
        payload = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _sse_end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stall(self, seconds: float | None) -> None:
        self.state.stopping.wait(seconds)
        self.close_connection = True

    # -- dispatch
    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        raw = self._read_body()
        path = self.path.split("?")[0]
        if path.startswith("/_fake/"):
            return self._control(method, path, raw)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if path.endswith(("/messages", "/messages/count_tokens")):
            kind = "anthropic"
        elif path.endswith(("/responses", "/chat/completions")):
            kind = "openai"
        elif path.endswith("/models"):
            kind = "openai" if "authorization" in headers else "anthropic"
        else:
            kind = "other"
        record = {
            "time": time.time(),
            "method": method,
            "path": self.path,
            "headers": headers,
            "body": body,
            "raw": raw.decode("utf-8", "replace"),
            "api_key": _key_of(headers),
            "kind": kind,
            "turn": None,
        }
        st = self.state
        with st.lock:
            st.requests.append(record)
            mode, expected = st.mode, st.api_key
        if mode == "stall":
            return self._stall(None)
        if kind != "other" and (mode == "unauthorized" or (expected is not None and record["api_key"] != expected)):
            return self._error(kind, 401, "invalid x-api-key" if kind == "anthropic" else "Incorrect API key provided")
        if method == "GET" and path.endswith("/models"):
            return self._json(200, {"object": "list", "data": [], "models": [], "has_more": False})
        if path.endswith("/messages/count_tokens"):
            return self._json(200, {"input_tokens": _count_tokens(body)})
        if method == "POST" and path.endswith("/messages") and isinstance(body, dict):
            return self._messages(record, body)
        if method == "POST" and path.endswith("/responses") and isinstance(body, dict):
            return self._responses(record, body)
        if kind != "other":
            return self._error(kind, 400, f"fake-llm: unsupported {method} {path}")
        return self._json(200, {})

    def _take_turn(self, record: dict, body: dict) -> dict:
        st = self.state
        main = bool(body.get("tools"))
        with st.lock:
            if (main or st.side_requests_take_turns) and st.turns:
                turn = st.turns.pop(0)
            elif main:
                turn = text("(fake-llm: no scripted turn left)")
            else:
                turn = text("ok")
        if turn["type"] == "tool_calls":
            try:
                turn = {"type": "tool_calls", "calls": [resolve_call(c, body) for c in turn["calls"]]}
            except (LookupError, ValueError) as e:
                turn = {"type": "error", "status": 500, "message": f"fake-llm: {e}"}
        record["turn"] = turn
        return turn

    def _error(self, kind: str, status: int, message: str | None) -> None:
        if kind == "anthropic":
            etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
            body = {"type": "error", "error": {"type": etype, "message": message or etype}}
            if status >= 400:
                body["request_id"] = self.state.next_id("req")
            return self._json(status, body, {"request-id": self.state.next_id("req")})
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
        etype = {401: "invalid_request_error", 429: "requests"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return self._json(status, {"error": {"message": message or f"error {status}", "type": etype, "param": None, "code": code}},
                          {"x-request-id": self.state.next_id("req")})

    # -- Anthropic Messages
    def _messages(self, record: dict, body: dict) -> None:
        turn = self._take_turn(record, body)
        if turn["type"] == "stall":
            return self._stall(turn.get("seconds"))
        if turn["type"] == "error":
            return self._error("anthropic", turn["status"], turn.get("message"))
        model = body.get("model", "claude-fake")
        msg_id = self.state.next_id("msg")
        in_tokens = _count_tokens(body)
        blocks: list[dict] = []
        if turn["type"] == "text":
            blocks.append({"type": "text", "text": turn["text"]})
            stop_reason = "end_turn"
        else:
            for c in turn["calls"]:
                blocks.append({"type": "tool_use", "id": self.state.next_id("toolu"), "name": c["name"],
                               "input": c.get("arguments", {"input": c.get("input", "")})})
            stop_reason = "tool_use"
        out_tokens = max(1, len(json.dumps(blocks)) // 4)
        usage = {"input_tokens": in_tokens, "output_tokens": out_tokens,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if not body.get("stream"):
            return self._json(200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                    "content": blocks, "stop_reason": stop_reason, "stop_sequence": None,
                                    "usage": usage}, {"request-id": self.state.next_id("req")})
        self._sse_start()
        self._sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                self._sse("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": {"type": "text", "text": ""}})
                if index == 0:
                    self._sse("ping", {"type": "ping"})
                for piece in _pieces(block["text"]):
                    self._sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                      "delta": {"type": "text_delta", "text": piece}})
            else:
                self._sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
                for piece in _pieces(json.dumps(block["input"])):
                    self._sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                      "delta": {"type": "input_json_delta", "partial_json": piece}})
            self._sse("content_block_stop", {"type": "content_block_stop", "index": index})
        self._sse("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                    "usage": {"output_tokens": out_tokens}})
        self._sse("message_stop", {"type": "message_stop"})
        self._sse_end()

    # -- OpenAI Responses
    def _responses(self, record: dict, body: dict) -> None:
        turn = self._take_turn(record, body)
        if turn["type"] == "stall":
            return self._stall(turn.get("seconds"))
        if turn["type"] == "error":
            return self._error("openai", turn["status"], turn.get("message"))
        model = body.get("model", "gpt-fake")
        resp_id = self.state.next_id("resp")
        items: list[dict] = []
        if turn["type"] == "text":
            items.append({"id": self.state.next_id("msg"), "type": "message", "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "text": turn["text"], "annotations": []}]})
        else:
            for c in turn["calls"]:
                if c.get("custom"):
                    items.append({"id": self.state.next_id("ctc"), "type": "custom_tool_call", "status": "completed",
                                  "call_id": self.state.next_id("call"), "name": c["name"], "input": c["input"]})
                else:
                    items.append({"id": self.state.next_id("fc"), "type": "function_call", "status": "completed",
                                  "call_id": self.state.next_id("call"), "name": c["name"],
                                  "arguments": json.dumps(c["arguments"])})
        in_tokens = _count_tokens(body)
        out_tokens = max(1, len(json.dumps(items)) // 4)
        usage = {"input_tokens": in_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": out_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": in_tokens + out_tokens}
        base = {"id": resp_id, "object": "response", "created_at": int(time.time()), "model": model,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
                "incomplete_details": None, "previous_response_id": None, "metadata": {}}
        final = {**base, "status": "completed", "output": items, "usage": usage}
        if not body.get("stream"):
            return self._json(200, final)
        seq = iter(range(1_000_000))

        def ev(kind: str, **data: Any) -> None:
            self._sse(kind, {"type": kind, "sequence_number": next(seq), **data})

        self._sse_start()
        ev("response.created", response={**base, "status": "in_progress", "output": [], "usage": None})
        ev("response.in_progress", response={**base, "status": "in_progress", "output": [], "usage": None})
        for index, item in enumerate(items):
            if item["type"] == "message":
                full = item["content"][0]["text"]
                ev("response.output_item.added", output_index=index,
                   item={**item, "status": "in_progress", "content": []})
                ev("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})
                for piece in _pieces(full):
                    ev("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=piece, logprobs=[])
                ev("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                   text=full, logprobs=[])
                ev("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                   part=item["content"][0])
            elif item["type"] == "function_call":
                ev("response.output_item.added", output_index=index,
                   item={**item, "status": "in_progress", "arguments": ""})
                for piece in _pieces(item["arguments"]):
                    ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=piece)
                ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                   arguments=item["arguments"], name=item["name"])
            else:  # custom_tool_call
                ev("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "input": ""})
                for piece in _pieces(item["input"]):
                    ev("response.custom_tool_call_input.delta", item_id=item["id"], output_index=index, delta=piece)
                ev("response.custom_tool_call_input.done", item_id=item["id"], output_index=index, input=item["input"])
            ev("response.output_item.done", output_index=index, item=item)
        ev("response.completed", response=final)
        self._sse_end()

    # -- control channel
    def _control(self, method: str, path: str, raw: bytes) -> None:
        st = self.state
        data = json.loads(raw) if raw else {}
        with st.lock:
            if path == "/_fake/script" and method == "POST":
                if data.get("replace"):
                    st.turns = []
                st.turns.extend(data.get("turns") or [])
                answer: Any = {"queued": len(st.turns)}
            elif path == "/_fake/requests":
                answer = {"requests": list(st.requests), "turns_left": len(st.turns)}
            elif path == "/_fake/reset" and method == "POST":
                st.turns, st.requests, st.mode = [], [], None
                answer = {"ok": True}
            elif path == "/_fake/config" and method == "POST":
                for key in ("mode", "api_key", "side_requests_take_turns"):
                    if key in data:
                        setattr(st, key, data[key])
                answer = {"ok": True}
            elif path == "/_fake/health":
                answer = {"ok": True}
            else:
                answer = None
        if answer is None:
            return self._json(404, {"error": "unknown control path"})
        return self._json(200, answer)


def _pieces(s: str, n: int = 3) -> list[str]:
    """Split s into up to n deltas (at least one, possibly empty)."""
    if not s:
        return [""]
    size = max(1, -(-len(s) // n))
    return [s[i:i + size] for i in range(0, len(s), size)]


def _count_tokens(body: Any) -> int:
    return max(1, len(json.dumps(body or {})) // 4)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def server_bind(self):  # no reverse DNS (HTTPServer.server_bind calls getfqdn)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


# --------------------------------------------------------------------------- public API


class FakeLLM:
    """The fake provider, served from threads of the current process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, api_key: str | None = None):
        self._state = _State(api_key)
        handler = type("Handler", (_Handler,), {"state": self._state})
        self._server = _Server((host, port), handler)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # URLs the CLIs take as their base URL
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def anthropic_url(self) -> str:  # ANTHROPIC_BASE_URL (the SDK appends /v1/messages)
        return self.url

    @property
    def openai_url(self) -> str:  # an OpenAI base URL (…/v1; codex appends /responses)
        return self.url + "/v1"

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.stopping.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # scripting
    def script(self, turns: list[dict], *, replace: bool = False) -> None:
        with self._state.lock:
            if replace:
                self._state.turns = []
            self._state.turns.extend(turns)

    def reset(self) -> None:
        with self._state.lock:
            self._state.turns, self._state.requests, self._state.mode = [], [], None

    def configure(self, **settings: Any) -> None:
        """mode ("unauthorized" | "stall" | None), api_key, side_requests_take_turns."""
        with self._state.lock:
            for key, value in settings.items():
                setattr(self._state, key, value)

    @property
    def mode(self) -> str | None:
        return self._state.mode

    @mode.setter
    def mode(self, value: str | None) -> None:
        self.configure(mode=value)

    def requests(self) -> list[dict]:
        with self._state.lock:
            return list(self._state.requests)

    def turns_left(self) -> int:
        with self._state.lock:
            return len(self._state.turns)

    # conveniences shared with RemoteFakeLLM
    def model_requests(self) -> list[dict]:
        return _model_requests(self.requests())


def _model_requests(requests: list[dict]) -> list[dict]:
    """The requests that asked for a completion (messages / responses), in order."""
    return [r for r in requests if r["method"] == "POST" and r["path"].split("?")[0].endswith(("/messages", "/responses"))]


class RemoteFakeLLM:
    """Controls a FakeLLM served by another process, through its /_fake/ endpoints."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.host, self.port = self.url.split("//")[1].rsplit(":", 1)
        self.port = int(self.port)

    @property
    def anthropic_url(self) -> str:
        return self.url

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    def _call(self, path: str, data: dict | None = None) -> Any:
        req = urllib.request.Request(self.url + path, method="POST" if data is not None else "GET",
                                     data=json.dumps(data).encode() if data is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def script(self, turns: list[dict], *, replace: bool = False) -> None:
        self._call("/_fake/script", {"turns": turns, "replace": replace})

    def reset(self) -> None:
        self._call("/_fake/reset", {})

    def configure(self, **settings: Any) -> None:
        self._call("/_fake/config", settings)

    @property
    def mode(self) -> str | None:
        raise AttributeError("write-only on a remote fake; use configure()")

    @mode.setter
    def mode(self, value: str | None) -> None:
        self.configure(mode=value)

    def requests(self) -> list[dict]:
        return self._call("/_fake/requests")["requests"]

    def turns_left(self) -> int:
        return self._call("/_fake/requests")["turns_left"]

    def model_requests(self) -> list[dict]:
        return _model_requests(self.requests())

    def health(self) -> bool:
        try:
            return bool(self._call("/_fake/health").get("ok"))
        except OSError:
            return False


# --------------------------------------------------------------------------- outside host (netns)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _free_subnet_octet() -> int:
    used = _ip("-o", "-4", "addr", "show").stdout
    for octet in range(1, 255):
        if f"198.18.{octet}." not in used:
            return octet
    raise RuntimeError("no free 198.18.X.0/24")


@contextlib.contextmanager
def outside_fake_llm(port: int = 8000, *, api_key: str | None = None) -> Iterator[RemoteFakeLLM]:
    """A FakeLLM on an "outside host": a fresh netns ``sbdllm_<hex>`` joined to the host by a veth
    (host side 198.18.X.1/24, namespace side 198.18.X.2/24, X = 1 unless taken, default route via
    the host). Sandboxes reach it only through their normal egress (forwarded + masqueraded by
    the host), never through the host's loopback. The server is a child process
    (``ip netns exec NS python3 -m tests.fake_llm``); the test scripts it and reads its recorded
    requests from the host over the same veth. Everything is removed on exit."""
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"sbdllm_{tag}", f"sbdllmh{tag}", f"sbdllmn{tag}"
    proc = None
    created_ns = created_link = False
    try:
        with open("/run/sandboxd-fake-llm.lock", "w") as lockf:  # concurrent fixtures pick distinct subnets
            fcntl.flock(lockf, fcntl.LOCK_EX)
            octet = _free_subnet_octet()
            host_ip, ns_ip = f"198.18.{octet}.1", f"198.18.{octet}.2"
            _ip("netns", "add", ns)
            created_ns = True
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            created_link = True
            _ip("link", "set", ns_if, "netns", ns)
            _ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", host_ip)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.fake_llm",
                "--host", "0.0.0.0", "--port", str(port)]
        if api_key:
            argv += ["--api-key", api_key]
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"fake LLM did not start: {line!r}")
        fake = RemoteFakeLLM(f"http://{ns_ip}:{port}")
        fake.namespace, fake.host_ip = ns, host_ip  # type: ignore[attr-defined]
        for _ in range(50):
            if fake.health():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("fake LLM control channel does not answer from the host")
        yield fake
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if created_link:
            _ip("link", "del", host_if, check=False)
        if created_ns:
            _ip("netns", "del", ns, check=False)


def fake_llm_fixture(scope: str = "function", **kwargs: Any):
    """A pytest fixture factory: ``fake_llm_outside = fake_llm_fixture()`` in a conftest or test
    module gives tests a RemoteFakeLLM on an outside host (reset between tests when shared)."""
    import pytest

    @pytest.fixture(scope=scope)
    def _fixture():
        with outside_fake_llm(**kwargs) as fake:
            yield fake

    return _fixture


def _pytest_fixtures():
    try:
        import pytest
    except ImportError:  # running as a plain server process
        return None, None

    @pytest.fixture
    def fake_llm():
        """An in-process FakeLLM on 127.0.0.1 (for host-level CLI tests)."""
        with FakeLLM() as fake:
            yield fake

    @pytest.fixture
    def fake_llm_outside():
        """A FakeLLM in its own netns, reachable from sandboxes through their egress only."""
        with outside_fake_llm() as fake:
            yield fake

    return fake_llm, fake_llm_outside


if "pytest" in sys.modules:
    fake_llm, fake_llm_outside = _pytest_fixtures()


# --------------------------------------------------------------------------- as a process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a fake Anthropic / OpenAI provider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    fake = FakeLLM(args.host, args.port, api_key=args.api_key).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"READY {fake.port}", flush=True)
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
