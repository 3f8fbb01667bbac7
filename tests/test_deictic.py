"""deictic, sandboxd's own coding agent: the real program as a subprocess on the host, against
the fake provider (tests/fake_llm.py) speaking both wire protocols over SSE on 127.0.0.1;
and its AgentKind (model checks, argv, env, ready files)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sandboxd.agents.base import GUEST_AGENTS_DIR
from sandboxd.agents.deictic_kind import CONFIG_PATH, DEICTIC
from sandboxd.errors import BadRequest
from tests.fake_llm import FakeLLM, error, stall, text, tool

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

SCRIPT = Path(__file__).resolve().parent.parent / "sandboxd" / "agents" / "deictic.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"  # what sandboxes run
KEY = "sk-test-0123456789abcdef-SECRET"
MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-5"}


@pytest.fixture
def fake():
    with FakeLLM(api_key=KEY) as server:
        yield server


@pytest.fixture(params=["anthropic", "openai"])
def proto(request):
    return request.param


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEICTIC_") and "proxy" not in k.lower()}
    env.update(extra)
    return env


def start(fake, proto, cwd: Path, *, key: str = KEY, model: str | None = None, task: str = "do the thing", **extra):
    base = fake.anthropic_url if proto == "anthropic" else fake.openai_url
    env = base_env(DEICTIC_API_KEY=key, DEICTIC_BASE_URL=base, **extra)
    argv = [PYTHON, "-s", "-B", str(SCRIPT), "--model", model or MODELS[proto], "--task", task]
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Run:
    def __init__(self, proc: subprocess.Popen, seconds: float):
        self.rc, self.seconds = proc.returncode, seconds
        self.stdout, self.stderr = proc.stdout.read(), proc.stderr.read()
        self.events = [json.loads(line) for line in self.stdout.splitlines()]  # every line is one JSON object
        assert KEY not in self.stdout and KEY not in self.stderr
        assert self.events and self.events[-1]["type"] == "summary", self.stdout + self.stderr
        assert [e["type"] for e in self.events].count("summary") == 1
        self.summary = self.events[-1]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def run(fake, proto, cwd: Path, timeout: float = 30, **kwargs) -> Run:
    t0 = time.monotonic()
    proc = start(fake, proto, cwd, **kwargs)
    proc.wait(timeout)
    return Run(proc, time.monotonic() - t0)


def tool_results_sent(fake, proto) -> list[dict]:
    """What the fake received back as tool results, in order: {id, output, is_error?}."""
    last = fake.model_requests()[-1]["body"]
    if proto == "anthropic":
        return [{"id": b["tool_use_id"], "output": b["content"], "is_error": b.get("is_error")}
                for m in last["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                for b in m["content"] if b["type"] == "tool_result"]
    return [{"id": i["call_id"], "output": i["output"]} for i in last["input"] if i.get("type") == "function_call_output"]


def test_tool_loop(fake, proto, tmp_path):
    fake.script([
        tool("write_file", path="sub/dir/hello.txt", content="hello from deictic\n"),
        tool("run_shell", command="cat sub/dir/hello.txt; exit 3"),
        tool("list_dir", path=".", depth=3),
        tool("read_file", path="sub/dir/hello.txt"),
        text("Wrote sub/dir/hello.txt and checked it.\nAll done."),
    ])
    r = run(fake, proto, tmp_path)
    assert r.rc == 0, r.stdout + r.stderr
    assert (tmp_path / "sub/dir/hello.txt").read_text() == "hello from deictic\n"
    assert r.events[0]["type"] == "start" and r.events[0]["protocol"] == proto and r.events[0]["model"] == MODELS[proto]
    assert [e["name"] for e in r.of("tool_call")] == ["write_file", "run_shell", "list_dir", "read_file"]
    results = r.of("tool_result")
    assert results[1]["exit_code"] == 3 and "hello from deictic" in results[1]["output"]
    assert "sub/dir/hello.txt" in results[2]["output"].splitlines()
    assert results[3]["output"] == "hello from deictic\n"
    assert all(e["ok"] for e in results) and "exit_code" not in results[0]
    assert "".join(e["text"] for e in r.of("text")) == "Wrote sub/dir/hello.txt and checked it.\nAll done."
    s = r.summary
    assert s["status"] == "completed" and s["text"] == "Wrote sub/dir/hello.txt and checked it.\nAll done."
    assert s["turns"] == 5 and len(r.of("usage")) == 5
    assert s["input_tokens"] == sum(u["input_tokens"] for u in r.of("usage")) > 0 and s["output_tokens"] > 0

    # the wire: streaming, auth headers, tools, and results fed back under the call ids
    reqs = fake.model_requests()
    assert len(reqs) == 5 and all(q["body"]["stream"] is True and q["api_key"] == KEY for q in reqs)
    names = {t["name"] for t in reqs[0]["body"]["tools"]}
    assert names == {"run_shell", "read_file", "write_file", "edit_file", "list_dir"}
    if proto == "anthropic":
        assert all(q["path"] == "/v1/messages" and q["headers"]["anthropic-version"] == "2023-06-01" for q in reqs)
        assert "input_schema" in reqs[0]["body"]["tools"][0]
    else:
        assert all(q["path"] == "/v1/responses" and q["headers"]["authorization"] == "Bearer " + KEY for q in reqs)
        assert reqs[0]["body"]["tools"][0]["type"] == "function"
    sent = tool_results_sent(fake, proto)
    assert [x["id"] for x in sent] == [e["id"] for e in r.of("tool_call")]
    assert sent[1]["output"].startswith("exit code 3\n")


def test_edit_file(fake, proto, tmp_path):
    (tmp_path / "app.py").write_text("x = 1\ny = 1\nprint(x)\n")
    (tmp_path / "dos.txt").write_bytes(b"one\r\ntwo\r\n")
    fake.script([
        tool("edit_file", path="dos.txt", old="two", new="TWO"),
        tool("edit_file", path="app.py", old="x = 1\n", new="x = 2\n"),
        tool("edit_file", path="app.py", old="z = 1", new="z = 2"),
        tool("edit_file", path="app.py", old=" = ", new=" := "),
        tool("edit_file", path="missing.py", old="a", new="b"),
        text("edited"),
    ])
    r = run(fake, proto, tmp_path)
    assert r.rc == 0 and r.summary["status"] == "completed"
    assert (tmp_path / "app.py").read_text() == "x = 2\ny = 1\nprint(x)\n"
    assert (tmp_path / "dos.txt").read_bytes() == b"one\r\nTWO\r\n"  # line endings kept
    _, ok, not_found, ambiguous, missing = r.of("tool_result")
    assert ok["ok"] and not (not_found["ok"] or ambiguous["ok"] or missing["ok"])
    assert "not found" in not_found["output"] and "occurs 2 times" in ambiguous["output"]
    assert "No such file" in missing["output"]
    sent = tool_results_sent(fake, proto)
    assert "not found" in sent[2]["output"]
    if proto == "anthropic":
        assert [x["is_error"] for x in sent] == [False, False, True, True, True]


def test_unauthorized_fails_at_once(fake, proto, tmp_path):
    fake.script([text("never")])
    r = run(fake, proto, tmp_path, key="sk-wrong-key-ABCDEFGH")
    assert r.rc == 1 and r.seconds < 3
    assert len(fake.model_requests()) == 1 and not r.of("retry")
    assert r.summary["status"] == "error" and "401" in r.summary["error"]
    assert "sk-wrong-key-ABCDEFGH" not in r.stdout + r.stderr


def test_server_error_is_retried(fake, proto, tmp_path):
    fake.script([error(500), error(503), text("fine after all")])
    r = run(fake, proto, tmp_path)
    assert r.rc == 0 and r.summary["text"] == "fine after all" and r.summary["turns"] == 1
    assert len(fake.model_requests()) == 3 and [e["attempt"] for e in r.of("retry")] == [1, 2]


def test_persistent_server_error_gives_up(fake, tmp_path):
    fake.script([error(500)] * 10)
    r = run(fake, "anthropic", tmp_path)
    assert r.rc == 1 and r.summary["status"] == "error" and "HTTP 500" in r.summary["error"]
    assert len(fake.model_requests()) == 4 and r.seconds < 10  # 1 + 3 retries, 0.5 + 1 + 2 s of backoff


def test_connection_refused_gives_up(proto, tmp_path):
    with FakeLLM() as gone:
        url = gone.anthropic_url if proto == "anthropic" else gone.openai_url
    env = base_env(DEICTIC_API_KEY=KEY, DEICTIC_BASE_URL=url)
    t0 = time.monotonic()
    p = subprocess.run([PYTHON, str(SCRIPT), "--model", MODELS[proto], "--task", "t"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, check=False, timeout=30)
    assert p.returncode == 1 and time.monotonic() - t0 < 10
    assert json.loads(p.stdout.splitlines()[-1])["status"] == "error"


def test_turn_budget(fake, proto, tmp_path):
    fake.script([tool("run_shell", command=f"echo {i} >> log") for i in range(5)] + [text("never reached")])
    r = run(fake, proto, tmp_path, DEICTIC_MAX_TURNS="2")
    assert r.rc == 3 and r.summary["status"] == "budget_exhausted" and r.summary["turns"] == 2
    assert (tmp_path / "log").read_text() == "0\n1\n"
    assert len(fake.model_requests()) == 2


def test_token_budget(fake, proto, tmp_path):
    fake.script([tool("run_shell", command="true"), text("never reached")])
    r = run(fake, proto, tmp_path, DEICTIC_MAX_TOKENS="50")  # the first request alone uses more
    assert r.rc == 3 and r.summary["status"] == "budget_exhausted" and r.summary["turns"] == 1
    assert "token budget" in r.summary["text"]


def read_events(proc) -> queue.Queue:
    events: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            events.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    return events


def wait_for(events: queue.Queue, kind: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        event = events.get(timeout=max(0.01, deadline - time.monotonic()))
        if event["type"] == kind:
            return event


def test_sigint_while_the_provider_stalls(fake, proto, tmp_path):
    fake.script([tool("run_shell", command="echo step one"), stall()])
    proc = start(fake, proto, tmp_path)
    events = read_events(proc)
    assert "step one" in wait_for(events, "tool_result")["output"]
    deadline = time.monotonic() + 10
    while len(fake.model_requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # it now waits for the stalled answer
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 130 and time.monotonic() - t0 < 2
    summary = wait_for(events, "summary")
    assert summary["status"] == "cancelled" and summary["turns"] == 1
    assert KEY not in proc.stderr.read()


def test_sigint_interrupts_a_long_command(fake, tmp_path):
    fake.script([tool("run_shell", command="echo started; sleep 60; echo never", timeout_seconds=120), text("x")])
    proc = start(fake, "openai", tmp_path)
    events = read_events(proc)
    wait_for(events, "tool_call")
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(5) == 130 and time.monotonic() - t0 < 3
    result = wait_for(events, "tool_result")
    assert "started" in result["output"] and "never" not in result["output"] and "[cancelled]" in result["output"]
    assert wait_for(events, "summary")["status"] == "cancelled"
    assert len(fake.model_requests()) == 1  # stopped after the step: no further request
    assert subprocess.run(["pgrep", "-f", "sleep 60; echo never"], capture_output=True, check=False).returncode == 1


def test_shell_timeout_and_output_cap(fake, tmp_path):
    fake.script([
        tool("run_shell", command="echo before; sleep 30", timeout_seconds=1),
        tool("run_shell", command="head -c 200000 /dev/zero | tr '\\0' a; echo; echo TAIL"),
        text("ok"),
    ])
    r = run(fake, "anthropic", tmp_path)
    assert r.rc == 0
    timed_out, big = r.of("tool_result")
    assert "timed out after 1 s" in timed_out["output"] and timed_out["exit_code"] in (130, 137)
    sent = tool_results_sent(fake, "anthropic")
    assert len(sent[1]["output"]) < 31_000 and sent[1]["output"].rstrip().endswith("TAIL") and "cut" in sent[1]["output"]
    assert len(big["output"]) < 2_100


def test_the_key_is_not_printed(fake, proto, tmp_path):
    fake.script([tool("run_shell", command=f"env; echo {KEY}"), text(f"the key was {KEY}")])
    r = run(fake, proto, tmp_path)  # Run() asserts the key is in neither stdout nor stderr
    assert r.rc == 0 and "DEICTIC_API_KEY" not in r.of("tool_result")[0]["output"]
    assert "[redacted]" in r.summary["text"]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--task", "t"], {"DEICTIC_API_KEY": KEY}),  # no model
        (["--model", "llama-3", "--task", "t"], {"DEICTIC_API_KEY": KEY}),
        (["--model", "gpt-5", "--task", "t"], {}),  # no key
        (["--model", "gpt-5"], {"DEICTIC_API_KEY": KEY}),  # no task
        (["--model", "gpt-5", "--task-file", "/nonexistent"], {"DEICTIC_API_KEY": KEY}),
        (["--model", "gpt-5", "--task", "t"], {"DEICTIC_API_KEY": KEY, "DEICTIC_MAX_TURNS": "zero"}),
    ],
)
def test_usage_errors(argv, env, tmp_path):
    env = base_env(HOME=str(tmp_path), **env)
    p = subprocess.run([PYTHON, str(SCRIPT), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=10)
    assert p.returncode == 2 and p.stderr.startswith("deictic: ")
    assert json.loads(p.stdout.splitlines()[-1])["status"] == "error"
    assert KEY not in p.stdout + p.stderr


def test_task_file_and_config_fallback(fake, tmp_path):
    """ready_files' config lets `python3 deictic.py --task ...` work through exec without env vars."""
    files = DEICTIC.ready_files(model="claude-haiku-4-5", llm_key=KEY, base_url=fake.anthropic_url)
    assert list(files) == [CONFIG_PATH] == ["/root/.config/deictic/config.json"]
    home = tmp_path / "home"
    (home / ".config/deictic").mkdir(parents=True)
    (home / ".config/deictic/config.json").write_text(files[CONFIG_PATH])
    (tmp_path / "task.txt").write_text("the task from a file")
    fake.script([text("done")])
    env = base_env(HOME=str(home))
    p = subprocess.run([PYTHON, str(SCRIPT), "--task-file", "task.txt"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, check=False, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert KEY not in p.stdout + p.stderr
    (req,) = fake.model_requests()
    assert req["api_key"] == KEY and req["body"]["model"] == "claude-haiku-4-5"
    assert req["body"]["messages"][0]["content"] == "the task from a file"


# --------------------------------------------------------------------------- the AgentKind


@pytest.mark.parametrize(("model", "code"), [(None, "missing_field"), ("", "missing_field"), ("llama-3", "invalid_model"),
                                             ("omni", "invalid_model"), ("o", "invalid_model"), ("Claude-3", "invalid_model")])
def test_kind_rejects_models(model, code):
    with pytest.raises(BadRequest) as exc:
        DEICTIC.check_model(model)
    assert exc.value.code == code and exc.value.field == "model" and exc.value.message.startswith("model: ")
    with pytest.raises(BadRequest):
        DEICTIC.run(model=model, task="t", llm_key=KEY, base_url=None)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "claude-3-5-haiku-latest", "gpt-5", "gpt-4.1-mini", "o3", "o4-mini"])
def test_kind_accepts_models(model):
    DEICTIC.check_model(model)


def test_kind_run_and_ready_files():
    assert DEICTIC.name == "deictic" and DEICTIC.needs_cli_layer is False
    r = DEICTIC.run(model="gpt-5", task="fix it; rm -rf 'x'", llm_key=KEY, base_url="http://10.0.0.1:8/v1")
    assert r.argv == ["/usr/bin/python3", "-s", "-B", GUEST_AGENTS_DIR + "/deictic.py", "--model", "gpt-5",
                      "--task", "fix it; rm -rf 'x'"]
    assert r.env == {"DEICTIC_API_KEY": KEY, "DEICTIC_BASE_URL": "http://10.0.0.1:8/v1"}
    assert DEICTIC.run(model="claude-x", task="t", llm_key=KEY, base_url=None).env == {"DEICTIC_API_KEY": KEY}
    assert DEICTIC.provider_for("claude-x") == "anthropic" and DEICTIC.provider_for("o3") == "openai"
    config = json.loads(DEICTIC.ready_files(model=None, llm_key=KEY, base_url=None)[CONFIG_PATH])
    assert config == {"api_key": KEY}


# --------------------------------------------------------------------------- streaming, mid-answer


class HalfAnswer:
    """A provider that streams the start of an answer (one long line of text), then stalls:
    shows that events are parsed as they arrive, and that a cancel cuts the stream."""

    LINE = "I am looking at the repository now and will report what I find in a moment, please wait.\n"

    def __init__(self, proto: str, *, hang_up: bool = False):
        import socket

        self.proto, self.release, self.hang_up, self.connections = proto, threading.Event(), hang_up, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}" + ("/v1" if proto == "openai" else "")
        threading.Thread(target=self.serve, daemon=True).start()

    def events(self) -> list[dict]:
        if self.proto == "anthropic":
            return [{"type": "message_start", "message": {"usage": {"input_tokens": 10, "output_tokens": 1}}},
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": self.LINE}}]
        return [{"type": "response.created", "response": {}},
                {"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "id": "m1"}},
                {"type": "response.output_text.delta", "output_index": 0, "item_id": "m1", "delta": self.LINE}]

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for ev in self.events():
                payload = f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(payload), payload))
            if self.hang_up:  # a clean end of the HTTP body, but not of the answer
                conn.sendall(b"0\r\n\r\n")
            else:
                self.release.wait(30)
            conn.close()

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cancel_mid_stream(proto, sig, tmp_path):
    server = HalfAnswer(proto)
    try:
        env = base_env(DEICTIC_API_KEY=KEY, DEICTIC_BASE_URL=server.url)
        proc = subprocess.Popen([PYTHON, "-s", "-B", str(SCRIPT), "--model", MODELS[proto], "--task", "look"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        events = read_events(proc)
        assert wait_for(events, "text")["text"] == HalfAnswer.LINE  # streamed before the answer ended
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(5) == (130 if sig == signal.SIGINT else 143) and time.monotonic() - t0 < 2
        summary = wait_for(events, "summary")
        assert summary["status"] == "cancelled" and summary["turns"] == 0
    finally:
        server.close()


def test_read_file_window(fake, tmp_path):
    (tmp_path / "big.txt").write_text("".join(f"line {i}\n" for i in range(1, 101)))
    fake.script([tool("read_file", path="big.txt", offset=10, limit=3), tool("list_dir", path="nope"), text("ok")])
    r = run(fake, "openai", tmp_path)
    window, missing = r.of("tool_result")
    assert window["output"] == "[lines 10-12 of 100]\nline 10\nline 11\nline 12\n"
    assert not missing["ok"] and missing["output"].startswith("error:")


def test_a_stream_cut_short_is_retried_not_taken_as_the_answer(proto, tmp_path):
    server = HalfAnswer(proto, hang_up=True)
    try:
        env = base_env(DEICTIC_API_KEY=KEY, DEICTIC_BASE_URL=server.url)
        p = subprocess.run([PYTHON, str(SCRIPT), "--model", MODELS[proto], "--task", "t"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=False, timeout=30)
    finally:
        server.close()
    summary = json.loads(p.stdout.splitlines()[-1])
    assert p.returncode == 1 and summary["status"] == "error" and "stream ended" in summary["error"]
    assert server.connections == 4
