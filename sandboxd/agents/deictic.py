"""deictic: sandboxd's own one-shot coding agent (standard library only).

Usage (inside a sandbox, from the read-only mount of this directory)::

    python3 -s -B /opt/sandboxd/agents/deictic.py --model MODEL (--task TEXT | --task-file FILE)

The loop: send the task (and the conversation so far) to the model, streaming the answer;
print its text as it comes; if it asked for tools, run them in the working directory (the
current directory), append the results to the conversation and ask again; when it answers
without asking for a tool, that answer is the summary. `claude*` models speak the Anthropic
Messages API (`POST {base}/v1/messages`), `gpt*` / `o<digit>*` models the OpenAI Responses
API (`POST {base}/responses`), both with `stream: true` parsed as Server-Sent Events.

Tools: run_shell, read_file, write_file, edit_file, list_dir.

Configuration: DEICTIC_API_KEY, DEICTIC_BASE_URL, DEICTIC_MAX_TURNS (30), DEICTIC_MAX_TOKENS
(200000 input + output tokens over the whole run), DEICTIC_MAX_OUTPUT_TOKENS (per answer),
DEICTIC_TIMEOUT (300 s without a byte from the provider). Without DEICTIC_API_KEY, the key
(and base_url, a default model) come from $DEICTIC_CONFIG or ~/.config/deictic/config.json.

Output: one JSON object per line on stdout, as it works (the API key is never printed: it is
removed from the tools' environment, and replaced by "[redacted]" in anything printed):

    {"type": "start", "model", "protocol": "anthropic"|"openai", "base_url", "cwd", "max_turns", "max_tokens"}
    {"type": "text", "text"}                     streamed answer text, deltas joined into lines
    {"type": "usage", "turn", "input_tokens", "output_tokens", "total_input_tokens", "total_output_tokens"}
    {"type": "tool_call", "id", "name", "input"}
    {"type": "tool_result", "id", "name", "ok", "output" (first/last 1000 characters), "exit_code"?}
    {"type": "retry", "attempt", "error", "delay"}
    {"type": "summary", "text", "status": "completed"|"budget_exhausted"|"cancelled"|"error",
     "turns", "input_tokens", "output_tokens", "error"?}     always the last line

Exit codes: 0 completed, 1 provider or internal error (401/403 at once; 429/5xx/connection
errors after a few retries with backoff), 2 usage error, 3 turn or token budget exhausted,
130 on SIGINT (143 on SIGTERM): cancelling stops after the current step (a running shell
command is interrupted, a model request abandoned) and prints a "cancelled" summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

TOOL_OUTPUT_CAP = 30_000  # characters of a tool result the model sees
EVENT_OUTPUT_CAP = 2_000  # characters of a tool result printed in events
RETRIES = 3  # after the first attempt, for 429 / 5xx / connection errors

SYSTEM = """You are deictic, a coding agent working in the directory {cwd} of a Linux sandbox.
Use the tools to inspect and change files and to run commands (you are root; the network may
be limited). Work step by step and check your work by running it. When the task is done (or
cannot be done), answer without calling a tool: a short, clean summary of what you did and
the result. That answer is your final output."""

TOOLS = [
    ("run_shell", "Run a bash command in the working directory; returns its exit code and combined stdout/stderr "
     + "(long output is cut in the middle).",
     {"command": {"type": "string"}, "timeout_seconds": {"type": "integer", "description": "default 120, max 1800"}},
     ["command"]),
    ("read_file", "Read a text file. offset: first line (1-based), limit: number of lines (default 2000).",
     {"path": {"type": "string"}, "offset": {"type": "integer"}, "limit": {"type": "integer"}}, ["path"]),
    ("write_file", "Create or overwrite a file with content (parent directories are created).",
     {"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"]),
    ("edit_file", "Replace the exact text `old` (which must occur exactly once) by `new` in a file.",
     {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}, ["path", "old", "new"]),
    ("list_dir", "List a directory (depth 1 by default, at most 5); directories end with '/'.",
     {"path": {"type": "string"}, "depth": {"type": "integer"}}, []),
]


class ProviderError(Exception):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class Cancelled(BaseException):
    pass


class UsageError(Exception):
    pass


# ----------------------------------------------------------------------------- output


class Out:
    """JSON lines on stdout, with the key redacted and streamed text coalesced."""

    def __init__(self, secret: str):
        self.secret = secret
        self.buf, self.since = "", 0.0

    def redact(self, text: str) -> str:
        return text.replace(self.secret, "[redacted]") if self.secret else text

    def emit(self, **event) -> None:
        if event.get("type") != "text":
            self.flush()
        try:
            sys.stdout.write(self.redact(json.dumps(event)) + "\n")
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass

    def text(self, delta: str) -> None:
        if not self.buf:
            self.since = time.monotonic()
        self.buf += delta
        if (len(self.buf) >= 80 and "\n" in delta) or len(self.buf) >= 2000 or time.monotonic() - self.since > 1:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            text, self.buf = self.buf, ""
            self.emit(type="text", text=text)


def clip(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    half = cap // 2
    return f"{text[:half]}\n[... {len(text) - cap} characters cut ...]\n{text[-half:]}"


# ----------------------------------------------------------------------------- tools


class Tools:
    def __init__(self, agent: Agent):
        self.agent = agent

    def call(self, name: str, args: dict) -> tuple[bool, str, int | None]:
        """(ok, output, exit_code) — exit_code only for run_shell."""
        fn = getattr(self, "t_" + name, None) if name in {t[0] for t in TOOLS} else None
        if fn is None:
            return False, f"error: unknown tool {name!r}", None
        try:
            return fn(**args)
        except TypeError as e:
            return False, f"error: bad arguments for {name}: {e}", None
        except (OSError, ValueError) as e:
            return False, f"error: {e}", None

    def t_run_shell(self, command: str, timeout_seconds: int = 120):
        timeout = max(1, min(int(timeout_seconds or 120), 1800))
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([shutil.which("bash") or "/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            deadline, note = time.monotonic() + timeout, ""
            try:
                while proc.poll() is None:
                    if self.agent.cancel_signal or time.monotonic() > deadline:
                        note = "\n[cancelled]" if self.agent.cancel_signal else f"\n[timed out after {timeout} s]"
                        self._kill(proc)
                        break
                    try:
                        proc.wait(0.1)
                    except subprocess.TimeoutExpired:
                        pass
            except BaseException:  # a second signal: no grace
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                raise
            size, half = os.fstat(out.fileno()).st_size, TOOL_OUTPUT_CAP // 2
            out.seek(0)
            if size <= TOOL_OUTPUT_CAP:
                data = out.read()
            else:  # keep the head and the tail, never the whole output in memory
                data = out.read(half) + f"\n[... {size - 2 * half} bytes cut ...]\n".encode()
                out.seek(size - half)
                data += out.read()
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode  # killed by N: 128 + N
        return True, data.decode("utf-8", "replace") + note, code

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        for sig, grace in ((signal.SIGINT, 1.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue

    def t_read_file(self, path: str, offset: int = 1, limit: int = 2000):
        start, limit, chunk, total = max(1, int(offset or 1)), max(1, int(limit or 2000)), [], 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for total, line in enumerate(f, 1):  # total ends as the number of lines
                if start <= total < start + limit:
                    chunk.append(line)
        text = "".join(chunk)
        if start > 1 or len(chunk) < total:
            text = f"[lines {start}-{start + len(chunk) - 1} of {total}]\n" + text
        return True, clip(text, TOOL_OUTPUT_CAP), None

    def t_write_file(self, path: str, content: str):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        return True, f"wrote {len(content.encode())} bytes to {path}", None

    def t_edit_file(self, path: str, old: str, new: str):
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as it is
            text = f.read()
        count = text.count(old) if old else 0
        if count != 1:
            why = "old is empty" if not old else "old text not found" if count == 0 else \
                f"old text occurs {count} times; include more context to make it unique"
            return False, f"error: {why} in {path}; the file is unchanged", None
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(text.replace(old, new, 1))
        return True, f"edited {path}", None

    def t_list_dir(self, path: str = ".", depth: int = 1):
        depth, entries = max(1, min(int(depth or 1), 5)), []

        def walk(d: str, prefix: str, level: int) -> None:
            for name in sorted(os.listdir(d)):
                if len(entries) >= 1000:
                    return
                full = os.path.join(d, name)
                is_dir = os.path.isdir(full) and not os.path.islink(full)
                entries.append(prefix + name + ("/" if is_dir else ""))
                if is_dir and level < depth and name != ".git":
                    walk(full, prefix + name + "/", level + 1)

        walk(path or ".", "", 1)
        more = "\n[... more entries cut]" if len(entries) >= 1000 else ""
        return True, ("\n".join(entries) or "(empty)") + more, None


# ----------------------------------------------------------------------------- providers


def sse_events(resp):
    """Yield the JSON data of each Server-Sent Event as it arrives."""
    data: list[str] = []
    for raw in resp:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data and data != ["[DONE]"]:
                yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data and data != ["[DONE]"]:
        yield json.loads("\n".join(data))


class Turn:
    def __init__(self):
        self.text, self.input_tokens, self.output_tokens = "", 0, 0
        self.calls: list[tuple] = []  # (call id, tool name, arguments, error or None)


class Anthropic:
    def __init__(self, agent):
        self.agent, self.messages = agent, [{"role": "user", "content": agent.task}]

    def request(self, max_tokens: int):
        tools = [{"name": n, "description": d, "input_schema": {"type": "object", "properties": p, "required": r}}
                 for n, d, p, r in TOOLS]
        body = {"model": self.agent.model, "max_tokens": max_tokens, "system": self.agent.system,
                "messages": self.messages, "tools": tools, "stream": True}
        headers = {"x-api-key": self.agent.key, "anthropic-version": "2023-06-01"}
        return self.agent.base_url + "/v1/messages", headers, body

    def parse(self, events, out: Out) -> Turn:
        turn, blocks = Turn(), {}
        for ev in events:
            t = ev.get("type")
            if t == "message_start":
                u = ev.get("message", {}).get("usage") or {}
                turn.input_tokens = sum(u.get(k) or 0 for k in
                                        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
                turn.output_tokens = u.get("output_tokens") or 0
            elif t == "content_block_start":
                cb = ev.get("content_block", {})
                blocks[ev.get("index", len(blocks))] = dict(cb, json="")
            elif t == "content_block_delta":
                b, d = blocks.setdefault(ev.get("index", 0), {"type": "text", "text": "", "json": ""}), ev.get("delta", {})
                if d.get("type") == "text_delta":
                    b["text"] = b.get("text", "") + d.get("text", "")
                    out.text(d.get("text", ""))
                elif d.get("type") == "input_json_delta":
                    b["json"] += d.get("partial_json", "")
            elif t == "content_block_stop":
                out.flush()
            elif t == "message_delta":
                u = ev.get("usage") or {}
                turn.output_tokens = u.get("output_tokens", turn.output_tokens)
                turn.input_tokens = max(turn.input_tokens, u.get("input_tokens") or 0)
            elif t == "error":
                err = ev.get("error", {})
                raise ProviderError(f"{err.get('type')}: {err.get('message')}",
                                    retryable=err.get("type") in ("overloaded_error", "api_error", "rate_limit_error"))
            elif t == "message_stop":
                break
        else:
            raise ProviderError("the stream ended before message_stop", retryable=True)
        out.flush()
        content = []
        for _, b in sorted(blocks.items()):
            if b.get("type") == "text" and b.get("text"):
                turn.text += b["text"]
                content.append({"type": "text", "text": b["text"]})
            elif b.get("type") == "tool_use":
                args, error = b.get("input") or {}, None
                if b["json"]:
                    try:
                        args = json.loads(b["json"])
                    except ValueError:
                        args, error = {}, "error: the tool input was not valid JSON (output cut?)"
                content.append({"type": "tool_use", "id": b.get("id"), "name": b.get("name"), "input": args})
                turn.calls.append((b.get("id"), b.get("name"), args, error))
        if content:
            self.messages.append({"role": "assistant", "content": content})
        return turn

    def add_results(self, results) -> None:
        self.messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": cid, "content": output, "is_error": not ok}
            for cid, ok, output in results]})


class OpenAI:
    def __init__(self, agent):
        self.agent, self.input = agent, [{"role": "user", "content": agent.task}]

    def request(self, max_tokens: int):
        tools = [{"type": "function", "name": n, "description": d,
                  "parameters": {"type": "object", "properties": p, "required": r}} for n, d, p, r in TOOLS]
        body = {"model": self.agent.model, "instructions": self.agent.system, "input": self.input,
                "tools": tools, "stream": True, "max_output_tokens": max_tokens}
        return self.agent.base_url + "/responses", {"Authorization": "Bearer " + self.agent.key}, body

    def parse(self, events, out: Out) -> Turn:
        turn, items, streamed = Turn(), {}, False

        def find(ev):
            if ev.get("output_index") in items:
                return items[ev["output_index"]]
            return next((i for i in items.values() if i.get("id") == ev.get("item_id")), {})

        for ev in events:
            t = ev.get("type", "")
            if t == "response.output_item.added":
                items[ev.get("output_index", len(items))] = dict(ev.get("item", {}))
            elif t == "response.output_text.delta":
                streamed = True
                turn.text += ev.get("delta", "")
                out.text(ev.get("delta", ""))
            elif t == "response.function_call_arguments.delta":
                item = find(ev)
                item["arguments"] = item.get("arguments", "") + ev.get("delta", "")
            elif t == "response.function_call_arguments.done":
                find(ev)["arguments"] = ev.get("arguments", "")
            elif t == "response.output_item.done":
                items[ev.get("output_index", len(items))] = dict(ev.get("item", {}))
                out.flush()
            elif t in ("response.completed", "response.incomplete"):
                resp = ev.get("response", {})
                u = resp.get("usage") or {}
                turn.input_tokens, turn.output_tokens = u.get("input_tokens") or 0, u.get("output_tokens") or 0
                if resp.get("output"):
                    items = dict(enumerate(resp["output"]))
                break
            elif t in ("response.failed", "error"):
                err = ev.get("response", {}).get("error") or ev.get("error") or ev
                code = str(err.get("code") or err.get("type") or "")
                raise ProviderError(f"{code}: {err.get('message')}", retryable=code in ("server_error", "rate_limit_exceeded"))
        else:
            raise ProviderError("the stream ended before response.completed", retryable=True)
        out.flush()
        for _, item in sorted(items.items()):
            if item.get("type") in ("message", "function_call", "reasoning"):
                self.input.append(item)  # the output items go back as they came (reasoning included)
            if item.get("type") == "message":
                text = "".join(c.get("text", "") for c in item.get("content", []) if c.get("type") == "output_text")
                if not streamed and text:
                    turn.text += text
                    out.emit(type="text", text=text)
            elif item.get("type") == "function_call":
                try:
                    args, error = json.loads(item.get("arguments") or "{}"), None
                except ValueError:
                    args, error = {}, "error: the tool arguments were not valid JSON (output cut?)"
                turn.calls.append((item.get("call_id"), item.get("name"), args if isinstance(args, dict) else {}, error))
        return turn

    def add_results(self, results) -> None:
        self.input.extend({"type": "function_call_output", "call_id": cid, "output": output}
                          for cid, ok, output in results)


# ----------------------------------------------------------------------------- the loop


class Agent:
    def __init__(self, model: str, task: str, key: str, base_url: str | None, out: Out):
        self.model, self.task, self.key, self.out = model, task, key, out
        self.cwd = os.getcwd()
        self.system = SYSTEM.format(cwd=self.cwd)
        self.max_turns = env_int("DEICTIC_MAX_TURNS", 30)
        self.max_tokens = env_int("DEICTIC_MAX_TOKENS", 200_000)
        self.read_timeout = env_int("DEICTIC_TIMEOUT", 300)  # seconds without a byte from the provider
        if model.startswith("claude"):
            self.proto = "anthropic"
            self.base_url = (base_url or "https://api.anthropic.com").rstrip("/")
            self.provider = Anthropic(self)
            self.max_output = 4096 if model.startswith("claude-3-") else 8192
        else:
            self.proto = "openai"
            self.base_url = (base_url or "https://api.openai.com/v1").rstrip("/")
            self.provider = OpenAI(self)
            self.max_output = 32768
        self.max_output = env_int("DEICTIC_MAX_OUTPUT_TOKENS", self.max_output)
        self.tools = Tools(self)
        self.turns = self.input_tokens = self.output_tokens = 0
        self.last_text = ""
        self.cancel_signal = 0  # the signal number once cancelled
        self.in_request = False  # a signal then abandons the model request at once

    def on_signal(self, signum, frame) -> None:
        first = not self.cancel_signal
        self.cancel_signal = self.cancel_signal or signum
        if self.in_request or not first:
            raise Cancelled()

    def ask(self) -> Turn:
        """One streamed model request, retried on 429 / 5xx / connection errors."""
        remaining = self.max_tokens - self.input_tokens - self.output_tokens
        url, headers, body = self.provider.request(max(1, min(self.max_output, remaining)))
        headers = dict(headers, **{"content-type": "application/json", "accept": "text/event-stream",
                                   "user-agent": "deictic/1"})
        data = json.dumps(body).encode()
        for attempt in range(RETRIES + 1):
            delay = min(0.5 * 2 ** attempt, 8.0)
            self.in_request = True
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.read_timeout) as resp:
                    return self.provider.parse(sse_events(resp), self.out)
            except urllib.error.HTTPError as e:
                detail = self.out.redact(e.read(2000).decode("utf-8", "replace").strip())
                err = ProviderError(f"HTTP {e.code} from {url}: {detail[:500]}",
                                    retryable=e.code in (408, 409, 429) or e.code >= 500)
                try:
                    delay = max(delay, min(float(e.headers.get("retry-after") or 0), 10.0))
                except ValueError:
                    pass
            except ProviderError as e:
                err = e
            except (OSError, ValueError, EOFError) as e:  # connection refused/reset, timeouts, bad JSON
                err = ProviderError(f"{type(e).__name__}: {e} ({url})", retryable=True)
            finally:
                self.in_request = False
            if not err.retryable or attempt == RETRIES:
                raise err
            self.out.emit(type="retry", attempt=attempt + 1, error=str(err)[:300], delay=delay)
            self.in_request = True
            try:
                time.sleep(delay)
            finally:
                self.in_request = False
        raise AssertionError("unreachable")

    def run(self) -> tuple[str, str]:
        """Returns (status, text)."""
        while True:
            if self.cancel_signal:
                return "cancelled", self.last_text
            if self.turns >= self.max_turns or self.input_tokens + self.output_tokens >= self.max_tokens:
                which = "turn" if self.turns >= self.max_turns else "token"
                return "budget_exhausted", (self.last_text + "\n\n" if self.last_text else "") + \
                    f"[stopped: the {which} budget ran out after {self.turns} turns]"
            turn = self.ask()
            self.turns += 1
            self.input_tokens += turn.input_tokens
            self.output_tokens += turn.output_tokens
            self.out.emit(type="usage", turn=self.turns, input_tokens=turn.input_tokens,
                          output_tokens=turn.output_tokens, total_input_tokens=self.input_tokens,
                          total_output_tokens=self.output_tokens)
            if turn.text.strip():
                self.last_text = turn.text.strip()
            if not turn.calls:
                return "completed", self.last_text
            results = []
            for cid, name, args, error in turn.calls:
                self.out.emit(type="tool_call", id=cid, name=name, input=args)
                if self.cancel_signal:
                    ok, output, code = False, "error: cancelled before it ran", None
                elif error:
                    ok, output, code = False, error, None
                else:
                    ok, output, code = self.tools.call(name, args)
                output = self.out.redact(output)
                event = {"type": "tool_result", "id": cid, "name": name, "ok": ok, "output": clip(output, EVENT_OUTPUT_CAP)}
                if code is not None:
                    event["exit_code"] = code
                    output = f"exit code {code}\n{output}"
                self.out.emit(**event)
                results.append((cid, ok, output))
            self.provider.add_results(results)


def env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name) or default)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{name} must be a positive integer")
    return value


def load_config() -> dict:
    path = os.environ.get("DEICTIC_CONFIG") or os.path.expanduser("~/.config/deictic/config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return config if isinstance(config, dict) else {}
    except (OSError, ValueError):
        return {}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def main(argv: list[str]) -> int:
    parser = Parser(prog="deictic", description="sandboxd's one-shot coding agent")
    parser.add_argument("--model", help="claude* (Anthropic) or gpt* / o<digit>* (OpenAI)")
    task_group = parser.add_mutually_exclusive_group(required=True)
    task_group.add_argument("--task", help="the task, as text")
    task_group.add_argument("--task-file", help="a file holding the task")

    config = {} if os.environ.get("DEICTIC_API_KEY") else load_config()
    key = os.environ.pop("DEICTIC_API_KEY", "") or str(config.get("api_key") or "")
    base_url = os.environ.get("DEICTIC_BASE_URL") or config.get("base_url") or None
    out = Out(key)
    agent = None
    try:
        opts = parser.parse_args(argv)
        model = opts.model or config.get("model") or ""
        if not (model.startswith(("claude", "gpt")) or (model[:1] == "o" and model[1:2].isdigit())):
            raise UsageError(f"--model: {model!r} is not a claude*, gpt* or o<digit>* model" if model else
                             "--model is required")
        if not key:
            raise UsageError("no API key: set DEICTIC_API_KEY (or api_key in ~/.config/deictic/config.json)")
        if opts.task_file:
            try:
                with open(opts.task_file, encoding="utf-8") as f:
                    opts.task = f.read()
            except OSError as e:
                raise UsageError(f"--task-file: {e}") from None
        if not opts.task.strip():
            raise UsageError("the task is empty")
        agent = Agent(model, opts.task, key, base_url, out)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, agent.on_signal)
        url = urllib.parse.urlsplit(agent.base_url)  # shown without any user:password@
        url = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()
        out.emit(type="start", model=model, protocol=agent.proto, base_url=url, cwd=agent.cwd,
                 max_turns=agent.max_turns, max_tokens=agent.max_tokens)
        status, text, error = *agent.run(), None
    except UsageError as e:
        print(f"deictic: {e}" + ("" if agent else f"\n{parser.format_usage().strip()}"), file=sys.stderr)
        out.emit(type="summary", text="", status="error", error=str(e), turns=0, input_tokens=0, output_tokens=0)
        return 2
    except Cancelled:
        status, text, error = "cancelled", agent.last_text, None
    except ProviderError as e:
        status, text, error = "error", agent.last_text, out.redact(str(e))
    except Exception as e:  # noqa: BLE001 -- a bug: still end with a summary
        status, text, error = "error", getattr(agent, "last_text", ""), out.redact(f"{type(e).__name__}: {e}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    summary = {"type": "summary", "text": text, "status": status, "turns": getattr(agent, "turns", 0),
               "input_tokens": getattr(agent, "input_tokens", 0), "output_tokens": getattr(agent, "output_tokens", 0)}
    if error:
        summary["error"] = error
    out.emit(**summary)
    if status == "cancelled":
        return 143 if getattr(agent, "cancel_signal", 0) == signal.SIGTERM else 130
    return {"completed": 0, "budget_exhausted": 3}.get(status, 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
