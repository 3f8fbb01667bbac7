"""The agent CLI layer and the claude-code / codex agent kinds, at host level (no sandbox API).

The real claude and codex binaries run in a chroot of the standard template's rootfs (an
overlay over it, in a private mount namespace) with the CLI layer bind-mounted read-only at
/opt/sandboxd/clis, exactly as a sandbox sees it, minus the network namespace: the chroot
shares the host's, so the CLIs reach the FakeLLM on 127.0.0.1. The argv and env come from the
agent kinds themselves, so what runs here is what the worker runs in a sandbox.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sandboxd.agents.base import GUEST_CLI_DIR
from sandboxd.agents.claude_code import CLAUDE_CODE
from sandboxd.agents.clis import PINNED, install_layer, layer_digest
from sandboxd.agents.codex import CODEX
from sandboxd.config import DEFAULT_CACHE_DIR
from sandboxd.errors import BadRequest
from tests import fake_llm as fl
from tests.fake_llm import FakeLLM, outside_fake_llm
from tests.helpers import standard_rootfs

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

KEY = "sk-test-0123456789abcdefghijklmnop"
CONTENT = "hello from the fake model 42\n"


@pytest.fixture(scope="module")
def layer():
    return install_layer(DEFAULT_CACHE_DIR)


@pytest.fixture(scope="module")
def rootfs():
    return standard_rootfs()


@pytest.fixture
def fake():
    with FakeLLM() as server:
        yield server


class Chroot:
    """An overlay over the template rootfs, with the layer at GUEST_CLI_DIR (read-only)."""

    def __init__(self, rootfs: Path, layer_dir: Path, tmp: Path):
        self.rootfs, self.layer_dir, self.tmp = rootfs, layer_dir, tmp
        for d in ("upper", "work", "merged"):
            (tmp / d).mkdir()
        self.upper = tmp / "upper"

    def put(self, path: str, content: str) -> None:
        """A file inside the chroot (written into the overlay's upper layer beforehand)."""
        target = self.upper / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o600)

    def file(self, path: str) -> Path:
        return self.upper / path.lstrip("/")

    def run(self, argv: list[str], env: dict[str, str], *, cwd: str = "/workspace", timeout: float = 120):
        m = self.tmp / "merged"
        setup = " && ".join([
            f"mount -t overlay overlay -o lowerdir={self.rootfs},upperdir={self.tmp}/upper,workdir={self.tmp}/work {m}",
            f"mkdir -p {m}{GUEST_CLI_DIR} {m}{cwd} {m}/root",
            f"mount --bind {self.layer_dir} {m}{GUEST_CLI_DIR}",
            f"mount -o remount,bind,ro {m}{GUEST_CLI_DIR}",
            f"mount -t proc proc {m}/proc",
            f"mount --rbind /dev {m}/dev",
            f"mount -t tmpfs tmpfs {m}/tmp",
        ])
        inner = f"cd {shlex.quote(cwd)} && exec \"$@\""
        script = f"{setup} && exec chroot {m} /bin/sh -c {shlex.quote(inner)} sh " + shlex.join(argv)
        full_env = {"PATH": f"{GUEST_CLI_DIR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8", **env}
        started = time.monotonic()
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-ec", script],
                              env=full_env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        proc.elapsed = time.monotonic() - started
        return proc


@pytest.fixture
def chroot(rootfs, layer):
    with tempfile.TemporaryDirectory(prefix="sandboxd-clitest-") as tmp:
        yield Chroot(rootfs, layer.host_dir, Path(tmp))


def jsonl(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# --------------------------------------------------------------------------- the layer


def test_layer_installed_and_reused(layer):
    assert layer.host_dir == DEFAULT_CACHE_DIR / "agent-clis" / layer_digest()
    assert layer.bin_dir == f"{GUEST_CLI_DIR}/bin"
    meta = json.loads((layer.host_dir / "layer.json").read_text())
    assert meta["pinned"] == PINNED
    assert meta["versions"]["claude"].startswith(PINNED["@anthropic-ai/claude-code"])
    assert meta["versions"]["codex"].endswith(PINNED["@openai/codex"])
    for name in ("claude", "codex"):
        link = layer.host_dir / "bin" / name
        assert link.is_symlink() and not os.readlink(link).startswith("/")  # works wherever mounted
        assert link.resolve().is_file()
    started = time.monotonic()
    assert install_layer(DEFAULT_CACHE_DIR) == layer  # cached: no npm
    assert time.monotonic() - started < 1


def test_clis_run_in_rootfs_without_node(chroot):
    proc = chroot.run(["/bin/sh", "-c", "command -v node || echo no-node; claude --version; codex --version"], {})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "no-node"
    assert lines[1].startswith(PINNED["@anthropic-ai/claude-code"])
    assert lines[2] == f"codex-cli {PINNED['@openai/codex']}"


# --------------------------------------------------------------------------- model rules


@pytest.mark.parametrize("model", [None, "claude-sonnet-4-5", "claude-opus-4-1-20250805", "claude-3-5-haiku-latest",
                                   "claude-sonnet-4@20250514"])
def test_claude_models_accepted(model):
    CLAUDE_CODE.check_model(model)


@pytest.mark.parametrize("model", ["sonnet", "opus", "haiku", "gpt-5", "o3", "Claude-sonnet", "", "claude x",
                                   "claude-" + "x" * 200, "claude\n", "--claude"])
def test_claude_models_refused(model):
    with pytest.raises(BadRequest) as err:
        CLAUDE_CODE.check_model(model)
    assert err.value.field == "model" and err.value.code == "invalid_model"


@pytest.mark.parametrize("model", [None, "gpt-5", "gpt-4.1-mini", "gpt-oss-120b", "o3", "o4-mini", "o1"])
def test_codex_models_accepted(model):
    CODEX.check_model(model)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "o", "omni", "oa3", "GPT-5", "", "gpt 5", "-gpt",
                                   "gpt-" + "x" * 200, "o3\n"])
def test_codex_models_refused(model):
    with pytest.raises(BadRequest) as err:
        CODEX.check_model(model)
    assert err.value.field == "model" and err.value.code == "invalid_model"


def test_run_rejects_a_bad_model_and_keeps_the_key_out_of_argv():
    with pytest.raises(BadRequest):
        CLAUDE_CODE.run(model="gpt-5", task="t", llm_key=KEY, base_url=None)
    with pytest.raises(BadRequest):
        CODEX.run(model="claude-x", task="t", llm_key=KEY, base_url=None)
    for kind, model in ((CLAUDE_CODE, "claude-sonnet-4-5"), (CODEX, "gpt-5")):
        run = kind.run(model=model, task="-rf looks like a flag", llm_key=KEY, base_url=None)
        assert all(KEY not in arg for arg in run.argv)
        assert run.argv[-2:] == ["--", "-rf looks like a flag"]
        assert KEY in run.env.values() and run.env["HOME"] == "/root"
    assert "ANTHROPIC_BASE_URL" not in CLAUDE_CODE.run(model=None, task="t", llm_key=KEY, base_url=None).env
    assert "https://api.openai.com/v1" in " ".join(CODEX.run(model=None, task="t", llm_key=KEY, base_url=None).argv)


# --------------------------------------------------------------------------- scripted runs


def test_claude_code_scripted_run(chroot, fake):
    fake.script([fl.write_file("hello.txt", CONTENT), fl.run("cat hello.txt"), fl.text("All done: hello.txt written.")])
    run = CLAUDE_CODE.run(model="claude-sonnet-4-5", task="-write hello.txt", llm_key=KEY, base_url=fake.anthropic_url)
    proc = chroot.run(run.argv, run.env, cwd=run.cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert chroot.file("/workspace/hello.txt").read_text() == CONTENT

    events = jsonl(proc.stdout)
    assert events[0]["type"] == "system" and events[0]["subtype"] == "init"
    tool_uses = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"] if b["type"] == "tool_use"]
    assert [t["name"] for t in tool_uses] == ["Write", "Bash"]
    assert tool_uses[0]["input"] == {"file_path": "/workspace/hello.txt", "content": CONTENT}
    results = [b for e in events if e["type"] == "user" for b in e["message"]["content"] if b["type"] == "tool_result"]
    assert CONTENT.strip() in json.dumps(results[1]["content"])
    final = events[-1]
    assert final["type"] == "result" and final["is_error"] is False and final["result"] == "All done: hello.txt written."

    requests = fake.model_requests()
    assert len(requests) == 3 and fake.turns_left() == 0
    for r in requests:
        assert r["api_key"] == KEY and r["headers"].get("x-api-key") == KEY
        assert r["body"]["model"] == "claude-sonnet-4-5" and r["body"]["stream"] is True
        assert {"Bash", "Write", "Read"} <= set(fl.tool_names(r["body"]))
    assert "-write hello.txt" in requests[0]["raw"]
    assert CONTENT.strip() in json.dumps(requests[2]["body"]["messages"])  # the cat output went back


def test_codex_scripted_run(chroot, fake):
    fake.script([fl.write_file("hello.txt", CONTENT), fl.run("cat hello.txt"), fl.text("All done: hello.txt written.")])
    run = CODEX.run(model="gpt-5", task="-write hello.txt", llm_key=KEY, base_url=fake.openai_url)
    proc = chroot.run(run.argv, run.env, cwd=run.cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert chroot.file("/workspace/hello.txt").read_text() == CONTENT

    events = jsonl(proc.stdout)
    assert events[0]["type"] == "thread.started"
    done = [e["item"] for e in events if e["type"] == "item.completed"]
    commands = [i for i in done if i["type"] in ("command_execution", "file_change")]
    assert len(commands) == 2 and commands[1]["type"] == "command_execution"
    assert commands[1]["exit_code"] == 0 and commands[1]["aggregated_output"] == CONTENT
    assert [i["text"] for i in done if i["type"] == "agent_message"] == ["All done: hello.txt written."]
    assert events[-1]["type"] == "turn.completed" and events[-1]["usage"]["output_tokens"] > 0

    requests = fake.model_requests()
    assert len(requests) == 3 and fake.turns_left() == 0
    for r in requests:
        assert r["path"] == "/v1/responses" and r["headers"].get("authorization") == f"Bearer {KEY}"
        assert r["body"]["model"] == "gpt-5" and r["body"]["stream"] is True
    assert "-write hello.txt" in requests[0]["raw"]
    assert CONTENT.strip() in json.dumps(requests[2]["body"]["input"])  # the cat output went back


@pytest.mark.parametrize("kind", [CLAUDE_CODE, CODEX], ids=["claude-code", "codex"])
def test_provider_401_fails_fast(kind, chroot):
    with FakeLLM(api_key="the-right-key") as fake:
        model = "claude-sonnet-4-5" if kind is CLAUDE_CODE else "gpt-5"
        base = fake.anthropic_url if kind is CLAUDE_CODE else fake.openai_url
        run = kind.run(model=model, task="say hi", llm_key=KEY, base_url=base)
        proc = chroot.run(run.argv, run.env, cwd=run.cwd, timeout=60)
        assert proc.returncode != 0
        assert proc.elapsed < 15, f"took {proc.elapsed:.1f} s"
        requests = fake.model_requests()
        assert 1 <= len(requests) <= 3 and all(r["api_key"] == KEY for r in requests)
        assert "401" in proc.stdout + proc.stderr


def test_ready_files_configure_the_clis_for_exec(chroot, fake):
    for kind in (CLAUDE_CODE, CODEX):
        base = fake.anthropic_url if kind is CLAUDE_CODE else fake.openai_url
        model = "claude-sonnet-4-5" if kind is CLAUDE_CODE else "gpt-5"
        for path, content in kind.ready_files(model=model, llm_key=KEY, base_url=base).items():
            chroot.put(path, content)
    fake.script([fl.text("claude is configured")])
    proc = chroot.run(["claude", "-p", "hello", "--dangerously-skip-permissions"], {"HOME": "/root"})
    assert proc.returncode == 0 and "claude is configured" in proc.stdout, proc.stdout + proc.stderr
    fake.script([fl.text("codex is configured")])
    proc = chroot.run(["codex", "exec", "--skip-git-repo-check", "hello"], {"HOME": "/root"})
    assert proc.returncode == 0 and "codex is configured" in proc.stdout, proc.stdout + proc.stderr
    requests = fake.model_requests()
    assert [r["path"].split("?")[0] for r in requests] == ["/v1/messages", "/v1/responses"]
    assert requests[0]["body"]["model"] == "claude-sonnet-4-5" and requests[1]["body"]["model"] == "gpt-5"
    assert all(r["api_key"] == KEY for r in requests)


# --------------------------------------------------------------------------- the fake itself


def _post(url: str, body: dict, headers: dict | None = None, timeout: float = 10):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def _sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_fake_anthropic_protocol(fake):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    fake.script([fl.run("ls"), fl.text("hi there")])
    status, ctype, body = _post(fake.url + "/v1/messages", {"model": "claude-x", "tools": tools, "stream": True},
                                {"x-api-key": "k"})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = _sse(body)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert events[1][1]["content_block"] == {"type": "tool_use", "id": events[1][1]["content_block"]["id"],
                                             "name": "Bash", "input": {}}
    partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta")
    assert json.loads(partial) == {"command": "ls"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    status, _, body = _post(fake.url + "/v1/messages", {"model": "claude-x", "tools": tools})
    message = json.loads(body)
    assert message["content"] == [{"type": "text", "text": "hi there"}] and message["stop_reason"] == "end_turn"
    status, _, body = _post(fake.url + "/v1/messages/count_tokens", {"model": "claude-x", "messages": []})
    assert status == 200 and json.loads(body)["input_tokens"] > 0
    fake.configure(api_key="right")
    status, _, body = _post(fake.url + "/v1/messages", {"model": "claude-x"}, {"x-api-key": "wrong"})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert [r["api_key"] for r in fake.requests()] == ["k", None, None, "wrong"]


def test_fake_openai_protocol(fake):
    tools = [{"type": "function", "name": "exec_command", "parameters": {}},
             {"type": "custom", "name": "apply_patch", "format": {}}]
    fake.script([fl.calls(fl.run("ls"), fl.write_file("a.txt", "x\n")), fl.text("bye"), fl.error(401)])
    status, _, body = _post(fake.openai_url + "/responses", {"model": "gpt-5", "tools": tools, "stream": True},
                            {"Authorization": "Bearer k"})
    events = _sse(body)
    names = [e for e, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in names and "response.custom_tool_call_input.done" in names
    items = events[-1][1]["response"]["output"]
    assert items[0]["type"] == "function_call" and json.loads(items[0]["arguments"]) == {"cmd": "ls"}
    assert items[1]["type"] == "custom_tool_call" and "*** Add File: a.txt\n+x\n" in items[1]["input"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    status, _, body = _post(fake.openai_url + "/responses", {"model": "gpt-5", "tools": tools})
    assert json.loads(body)["output"][0]["content"][0]["text"] == "bye"
    status, _, body = _post(fake.openai_url + "/responses", {"model": "gpt-5", "tools": tools})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


def test_fake_stall_holds_the_connection(fake):
    fake.script([fl.stall()])
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        _post(fake.url + "/v1/messages", {"model": "claude-x", "tools": [{"name": "Bash"}]}, timeout=1)
    assert time.monotonic() - started >= 0.9


def test_fake_llm_outside_host():
    with outside_fake_llm(api_key="outside-key") as fake:
        assert fake.host.startswith("198.18.") and fake.host.endswith(".2")
        assert fake.namespace in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        fake.script([fl.text("from outside")])
        status, _, body = _post(fake.anthropic_url + "/v1/messages", {"model": "claude-x", "tools": [{"name": "Bash"}]},
                                {"x-api-key": "outside-key"})
        assert status == 200 and json.loads(body)["content"][0]["text"] == "from outside"
        requests = fake.requests()
        assert len(requests) == 1 and requests[0]["api_key"] == "outside-key"
        assert requests[0]["headers"]["host"] == f"{fake.host}:{fake.port}"
        namespace, tag = fake.namespace, fake.namespace.split("_")[1]
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert f"sbdllmh{tag}" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
