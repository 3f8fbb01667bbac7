"""Agents end to end through the API: deictic (and claude-code / codex when their CLI layer
installs here) against a fake provider on an "outside host" that sandboxes reach only through
their normal egress. The llm_key must never show up anywhere but in the agent's process."""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from tests.fake_llm import outside_fake_llm, text, tool, write_file
from tests.helpers import Server, assert_error, exec_ok, wait_for

LLM_KEY = "sk-ant-sbdtest-" + secrets.token_hex(16)
GRACE_SECONDS = 3.0
SEEN: list[str] = []  # every API answer body, checked for the key at the end


@pytest.fixture(scope="module")
def fake():
    with outside_fake_llm(api_key=LLM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def agent_server(fake):
    """Its own server, so its log, database and data dir can be searched for the key. The
    operator points Anthropic at the fake; OpenAI models get llm_base_url per request."""
    srv = Server("--reaper-interval", "0.5", "--anthropic-base-url", fake.anthropic_url)
    os.environ["SANDBOXD_AGENT_CANCEL_GRACE_SECONDS"] = str(GRACE_SECONDS)
    try:
        srv.start()
    finally:
        del os.environ["SANDBOXD_AGENT_CANCEL_GRACE_SECONDS"]
    srv.key = srv.create_key("agent-tester")
    yield srv
    srv.destroy_all([srv.key])
    srv.stop()
    srv.remove_data()


@pytest.fixture
def api(agent_server, fake):
    fake.reset()
    fake.configure(api_key=LLM_KEY)
    with agent_server.client(agent_server.key) as client:
        created: list[str] = []
        client.created = created
        yield client
        for vm_id in created:
            client.delete(f"/v1/sandboxes/{vm_id}")


def record(response):
    SEEN.append(response.text)
    return response


def create(api, **body):
    response = record(api.post("/v1/sandboxes", json={"template": "standard", **body}))
    if response.status_code == 201:
        api.created.append(response.json()["vm_id"])
    return response


def get(api, vm_id):
    return record(api.get(f"/v1/sandboxes/{vm_id}")).json()


def agent_done(api, vm_id):
    body = get(api, vm_id)
    return body if body.get("agent_status") in ("completed", "failed") else None


def agent_logs(api, vm_id):
    response = record(api.get(f"/v1/sandboxes/{vm_id}/logs", params={"limit": 10000}))
    assert response.status_code == 200, response.text
    # the coding agent's output (stream "system" + source "agent" are the guest agent's own lines)
    return [e for e in response.json()["entries"] if e["source"] == "agent" and e["stream"] != "system"]


# --- bad input -------------------------------------------------------------------------


def test_bad_agent_input_is_refused_naming_the_field(api):
    base = {"template": "standard", "agent": "deictic", "model": "claude-sonnet-4-5", "llm_key": LLM_KEY}
    assert_error(record(api.post("/v1/sandboxes", json={**base, "agent": "gemini-cli"})), 501, "unknown_agent", "agent")
    no_key = {k: v for k, v in base.items() if k != "llm_key"}
    assert_error(record(api.post("/v1/sandboxes", json=no_key)), 400, "missing_field", "llm_key")
    assert_error(record(api.post("/v1/sandboxes", json={**base, "model": "llama-3"})), 400, "invalid_model", "model")
    no_model = {k: v for k, v in base.items() if k != "model"}
    assert_error(record(api.post("/v1/sandboxes", json=no_model)), 400, "missing_field", "model")
    big = "x" * (64 * 1024 + 1)
    assert_error(record(api.post("/v1/sandboxes", json={**base, "task": big})), 400, None, "task")
    wide = "é" * (40 * 1024)  # under 64 Ki characters, over 64 KiB of UTF-8
    assert_error(record(api.post("/v1/sandboxes", json={**base, "task": wide})), 400, "task_too_large", "task")
    for url in ("ftp://example.com", "not a url", "http://", "https://ex ample.com/v1", "http://h:99999"):
        response = record(api.post("/v1/sandboxes", json={**base, "task": "t", "llm_base_url": url}))
        assert_error(response, 400, "invalid_url", "llm_base_url")
    too_long = "https://example.com/" + "a" * 2048
    assert_error(record(api.post("/v1/sandboxes", json={**base, "llm_base_url": too_long})), 400, None, "llm_base_url")
    assert_error(
        record(api.post("/v1/sandboxes", json={"template": "standard", "llm_base_url": "https://example.com"})),
        400, "agent_required", "llm_base_url",
    )  # fmt: skip
    for agent, model in (("claude-code", "gpt-5"), ("codex", "claude-sonnet-4-5")):
        response = record(api.post("/v1/sandboxes", json={**base, "agent": agent, "model": model}))
        if response.status_code == 501:  # that kind is not installed in this checkout
            assert_error(response, 501, "agent_not_available", "agent")
        else:
            assert_error(response, 400, "invalid_model", "model")
    assert not api.get("/v1/sandboxes").json()  # nothing was created


# --- a run that completes ----------------------------------------------------------------


def test_deictic_task_runs_to_completion_and_logs_its_events(api, fake):
    fake.script([
        tool("run_shell", command="sleep 1; echo step-one"),
        tool("write_file", path="hello.txt", content="hello from deictic\n"),
        text("wrote hello.txt"),
    ])  # fmt: skip
    response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY, task="write hello.txt")
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    assert set(response.json()) == {"vm_id", "state", "host_port", "endpoint"}
    body = get(api, vm_id)
    assert body["agent"] == "deictic" and body["agent_status"] == "running", body
    assert "agent_exit_code" not in body
    done = wait_for(lambda: agent_done(api, vm_id), timeout=60)
    assert done["agent_status"] == "completed" and done["agent_exit_code"] == 0, done
    assert done["state"] == "running"  # results stay readable until the idle timeout
    assert exec_ok(api, vm_id, "cat /workspace/hello.txt")["stdout"] == "hello from deictic\n", agent_logs(api, vm_id)
    entries = agent_logs(api, vm_id)
    texts = "\n".join(e["text"] for e in entries)
    assert '"type": "summary"' in texts or '"type":"summary"' in texts, texts[-2000:]
    assert "step-one" in texts
    # the key reached the provider (through the sandbox's egress, via the operator's base URL)
    model_calls = fake.model_requests()
    assert model_calls and all(r["api_key"] == LLM_KEY for r in model_calls)
    assert all(r["path"].startswith("/v1/messages") for r in model_calls)
    # the agent's process id is visible as a background process, its env is not
    processes = record(api.get(f"/v1/sandboxes/{vm_id}/processes")).json()
    assert LLM_KEY not in str(processes)


def test_llm_base_url_in_the_request_wins_and_openai_models_work(api, fake):
    fake.script([tool("write_file", path="out.txt", content="via responses\n"), text("done")])
    response = create(
        api, agent="deictic", model="gpt-5", llm_key=LLM_KEY, task="write out.txt", llm_base_url=fake.openai_url
    )
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    done = wait_for(lambda: agent_done(api, vm_id), timeout=60)
    assert done["agent_status"] == "completed", (done, agent_logs(api, vm_id)[-5:])
    assert exec_ok(api, vm_id, "cat out.txt")["stdout"] == "via responses\n"
    assert [r["path"] for r in fake.model_requests()][:1] == ["/v1/responses"]


def test_agent_keeps_its_sandbox_busy_then_the_idle_timer_starts(api, fake):
    fake.script([tool("run_shell", command="sleep 5"), text("slept")])
    response = create(
        api, agent="deictic", model="claude-haiku-4-5", llm_key=LLM_KEY, task="sleep", idle_timeout_seconds=2
    )
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    time.sleep(4)  # past the idle timeout, while the agent runs
    body = get(api, vm_id)
    assert body["state"] == "running" and body["agent_status"] == "running", body
    done = wait_for(lambda: agent_done(api, vm_id), timeout=60)
    assert done["agent_status"] == "completed", done
    ended = time.monotonic()
    gone = wait_for(lambda: (s := get(api, vm_id))["state"] == "destroyed" and s, timeout=30)
    assert gone["reason"] == "idle_timeout"
    assert time.monotonic() - ended >= 1.0  # the timer started when the agent ended, not before


# --- failures and cancel ------------------------------------------------------------------


def test_provider_401_fails_the_run_within_seconds(api, fake):
    wrong = "sk-ant-wrong-" + secrets.token_hex(8)
    started = time.monotonic()
    response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=wrong, task="anything")
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    done = wait_for(lambda: agent_done(api, vm_id), timeout=30)
    assert time.monotonic() - started < 20
    assert done["agent_status"] == "failed" and done["agent_exit_code"] not in (None, 0), done
    entries = agent_logs(api, vm_id)
    assert entries and wrong not in str(entries)
    assert exec_ok(api, vm_id, "echo still-usable")["stdout"] == "still-usable\n"
    assert_error(record(api.post(f"/v1/sandboxes/{vm_id}/cancel")), 409, "no_running_agent")


def test_cancel_stops_a_stalled_agent_and_the_sandbox_stays_usable(api, fake):
    fake.configure(mode="stall")
    try:
        response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY, task="think hard")
        assert response.status_code == 201, response.text
        vm_id = response.json()["vm_id"]
        wait_for(lambda: fake.model_requests(), timeout=30)  # the request hangs at the provider
        assert get(api, vm_id)["agent_status"] == "running"
        cancelled_at = time.monotonic()
        response = record(api.post(f"/v1/sandboxes/{vm_id}/cancel"))
        assert response.status_code == 200, response.text
        assert response.json() == {"vm_id": vm_id, "cancelled": True, "reason": "user_request"}
        assert time.monotonic() - cancelled_at < GRACE_SECONDS  # does not wait for the grace period
        done = wait_for(lambda: agent_done(api, vm_id), timeout=GRACE_SECONDS + 10)
        assert time.monotonic() - cancelled_at < GRACE_SECONDS + 8
        assert done["agent_status"] == "failed" and done["agent_exit_code"] not in (None, 0), done
        assert done["state"] == "running"
        assert exec_ok(api, vm_id, "echo after-cancel")["stdout"] == "after-cancel\n"
        assert_error(record(api.post(f"/v1/sandboxes/{vm_id}/cancel")), 409, "no_running_agent")
    finally:
        fake.configure(mode=None)


def test_cancel_escalates_to_sigkill_when_the_agent_does_not_stop(api, fake):
    # the agent stops itself (SIGSTOP): SIGINT and SIGTERM stay pending, SIGKILL ends it
    fake.script([tool("run_shell", command="kill -STOP $PPID"), text("never reached")])
    response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY, task="freeze")
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    state_of_agent = (
        "for p in /proc/[0-9]*; do grep -qs 'deictic[.]py' $p/cmdline && cut -d' ' -f3 $p/stat; done; true"
    )
    wait_for(lambda: exec_ok(api, vm_id, state_of_agent)["stdout"].strip() == "T", timeout=30)
    cancelled_at = time.monotonic()
    response = record(api.post(f"/v1/sandboxes/{vm_id}/cancel"))
    assert response.json() == {"vm_id": vm_id, "cancelled": True, "reason": "user_request"}
    done = wait_for(lambda: agent_done(api, vm_id), timeout=GRACE_SECONDS + 20)
    elapsed = time.monotonic() - cancelled_at
    assert done["agent_status"] == "failed" and done["agent_exit_code"] == 137, done  # 128 + SIGKILL
    assert elapsed >= GRACE_SECONDS + 4, elapsed  # the grace, SIGTERM, ~5 s more, then SIGKILL
    assert exec_ok(api, vm_id, "echo alive")["stdout"] == "alive\n"


def test_cancel_without_a_running_agent_is_409(api):
    response = create(api)
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    assert_error(record(api.post(f"/v1/sandboxes/{vm_id}/cancel")), 409, "no_running_agent")
    assert_error(record(api.post("/v1/sandboxes/sbx_00000000/cancel")), 404)


def test_an_agent_destroyed_with_its_sandbox_is_failed(api, fake):
    fake.configure(mode="stall")
    try:
        response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY, task="wait")
        assert response.status_code == 201, response.text
        vm_id = response.json()["vm_id"]
        wait_for(lambda: fake.model_requests(), timeout=30)
        assert record(api.delete(f"/v1/sandboxes/{vm_id}")).json()["state"] == "destroyed"
        body = get(api, vm_id)
        assert body["state"] == "destroyed" and body["agent_status"] == "failed", body
    finally:
        fake.configure(mode=None)


def test_a_running_agent_survives_a_control_plane_restart(fake):
    args = ("--reaper-interval", "0.5", "--anthropic-base-url", fake.anthropic_url)
    first = Server(*args).start()
    second = None
    try:
        key = first.create_key("restarter")
        fake.reset()
        fake.configure(api_key=LLM_KEY)
        fake.script([tool("run_shell", command="sleep 4; echo slept > after-restart.txt"), text("done")])
        with first.client(key) as client:
            response = record(client.post("/v1/sandboxes", json={
                "template": "standard", "agent": "deictic", "model": "claude-sonnet-4-5", "llm_key": LLM_KEY,
                "task": "sleep across a restart",
            }))  # fmt: skip
            assert response.status_code == 201, response.text
            vm_id = response.json()["vm_id"]
        first.kill()  # no clean shutdown: the worker re-adopts the sandbox from state.json
        second = Server(*args, data_dir=first.data_dir).start()
        with second.client(key) as client:
            body = get(client, vm_id)
            assert body["state"] == "running" and body["agent_status"] == "running", body
            done = wait_for(lambda: agent_done(client, vm_id), timeout=60)
            assert done["agent_status"] == "completed" and done["agent_exit_code"] == 0, done
            assert exec_ok(client, vm_id, "cat after-restart.txt")["stdout"] == "slept\n"
            client.delete(f"/v1/sandboxes/{vm_id}")
        for server in (first, second):
            assert LLM_KEY.encode() not in server.log_path.read_bytes()
    finally:
        for server in (second, first):
            if server is not None:
                server.stop()
        first.destroy_all([])
        first.remove_data()
        if second is not None:
            second.log_path.unlink(missing_ok=True)


# --- an agent without a task ---------------------------------------------------------------


def test_agent_without_task_leaves_it_ready_for_exec(api, fake):
    response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY)
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    body = get(api, vm_id)
    assert body["agent"] == "deictic" and body.get("agent_status") is None, body
    assert_error(record(api.post(f"/v1/sandboxes/{vm_id}/cancel")), 409, "no_running_agent")
    help_text = exec_ok(api, vm_id, "python3 /opt/sandboxd/agents/deictic.py --help")
    assert help_text["exit_code"] == 0 and "--task" in help_text["stdout"], help_text
    # the configured key works through exec (it is in the agent's config file, not the env)
    fake.script([tool("write_file", path="by-exec.txt", content="ok\n"), text("done")])
    result = exec_ok(api, vm_id, "python3 -s -B /opt/sandboxd/agents/deictic.py --task 'write by-exec.txt'")
    assert result["exit_code"] == 0, result
    assert exec_ok(api, vm_id, "cat by-exec.txt")["stdout"] == "ok\n"
    assert LLM_KEY not in exec_ok(api, vm_id, "env")["stdout"]
    assert LLM_KEY not in record(api.get(f"/v1/sandboxes/{vm_id}/logs", params={"limit": 10000})).text


def test_deictic_is_in_every_sandbox(api):
    response = create(api)
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    result = exec_ok(api, vm_id, "python3 /opt/sandboxd/agents/deictic.py --help; touch /opt/sandboxd/agents/x")
    assert "--task" in result["stdout"] and "Read-only" in result["stderr"], result


# --- claude-code and codex (need their CLI layer: npm on first use) ---------------------------


def _cli_kind_available(api, agent: str) -> bool:
    body = {"template": "standard", "agent": agent, "model": "x-invalid", "llm_key": LLM_KEY}
    response = record(api.post("/v1/sandboxes", json=body))
    assert response.status_code in (400, 501), response.text
    return response.status_code == 400


@pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed")
def test_codex_is_refused_on_gvisor(api, fake):
    """codex never reaps its tools' shells under Debian's 2022 gVisor, so its turn would never
    end: a clear 400 instead of a run that hangs (README: Runtimes)."""
    if not _cli_kind_available(api, "codex"):
        pytest.skip("codex is not available in this checkout")
    body = {"agent": "codex", "model": "gpt-5", "llm_key": LLM_KEY, "llm_base_url": fake.openai_url}
    assert_error(create(api, runtime="gvisor", task="write cli.txt", **body), 400, "agent_unsupported", "agent")
    assert_error(create(api, runtime="gvisor", **body), 400, "agent_unsupported", "agent")  # no task: same CLI


@pytest.mark.parametrize(
    "agent, model, url_attr, version_command",
    [
        ("claude-code", "claude-sonnet-4-5", "anthropic_url", "claude --version"),
        # refused on gVisor: test_codex_is_refused_on_gvisor
        pytest.param("codex", "gpt-5", "openai_url", "codex --version", marks=pytest.mark.only_runtimes("oci")),
    ],
)
def test_cli_agents(api, fake, agent, model, url_attr, version_command):
    if not _cli_kind_available(api, agent):
        pytest.skip(f"{agent} is not available in this checkout")
    # without a task: the CLI on PATH for exec, the key configured, nothing in the env
    response = create(api, agent=agent, model=model, llm_key=LLM_KEY, llm_base_url=getattr(fake, url_attr))
    assert response.status_code == 201, response.text
    ready = response.json()["vm_id"]
    result = exec_ok(api, ready, version_command)
    assert result["exit_code"] == 0, result
    assert LLM_KEY not in exec_ok(api, ready, "env")["stdout"]
    # with a task: a file written, stream-json / JSONL events in the logs
    fake.reset()
    fake.configure(api_key=LLM_KEY)
    fake.script([write_file("cli.txt", f"from {agent}\n"), text("done")])
    response = create(
        api, agent=agent, model=model, llm_key=LLM_KEY, task="write cli.txt", llm_base_url=getattr(fake, url_attr)
    )
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    done = wait_for(lambda: agent_done(api, vm_id), timeout=120)
    entries = agent_logs(api, vm_id)
    assert done["agent_status"] == "completed" and done["agent_exit_code"] == 0, (done, entries[-10:])
    turns = [(r["path"], r["turn"]) for r in fake.model_requests()]
    assert exec_ok(api, vm_id, "cat cli.txt")["stdout"] == f"from {agent}\n", (turns, entries[-10:])
    assert any(e["text"].startswith("{") for e in entries), entries[-10:]
    # cancel while the provider stalls: SIGINT, then SIGTERM after the grace if it is ignored
    fake.reset()
    fake.configure(api_key=LLM_KEY, mode="stall")
    try:
        response = create(api, agent=agent, model=model, llm_key=LLM_KEY, task="think", llm_base_url=getattr(fake, url_attr))
        assert response.status_code == 201, response.text
        vm_id = response.json()["vm_id"]
        wait_for(lambda: fake.model_requests(), timeout=60)
        cancelled_at = time.monotonic()
        response = record(api.post(f"/v1/sandboxes/{vm_id}/cancel"))
        assert response.json() == {"vm_id": vm_id, "cancelled": True, "reason": "user_request"}
        done = wait_for(lambda: agent_done(api, vm_id), timeout=GRACE_SECONDS + 15)
        assert time.monotonic() - cancelled_at < GRACE_SECONDS + 10
        # failed, whatever the exit code (claude exits 0 on SIGINT, deictic 130)
        assert done["agent_status"] == "failed" and done["agent_exit_code"] is not None, done
        assert exec_ok(api, vm_id, "echo ok")["stdout"] == "ok\n"
    finally:
        fake.configure(mode=None)


# --- the key never leaks --------------------------------------------------------------------


def _files_under(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # a sandbox's own filesystem (mounted layer, overlay root) is the sandbox's business
        dirnames[:] = [d for d in dirnames if not (here.name == "runtime" and d in ("layer", "rootfs"))]
        for name in filenames:
            path = here / name
            if name == "disk.img" or not path.is_file() or path.is_symlink():
                continue
            yield path


def test_llm_key_is_never_logged_returned_or_stored(api, agent_server, fake):
    # one more run, still alive while its data dir is searched
    fake.script([tool("run_shell", command="sleep 1; echo $DEICTIC_API_KEY | wc -c"), text("done")])
    response = create(api, agent="deictic", model="claude-sonnet-4-5", llm_key=LLM_KEY, task="look around")
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    assert agent_done(api, vm_id) is None  # still running: its process holds the key now
    wait_for(lambda: agent_done(api, vm_id), timeout=60)
    # exec'd commands never get it (the guest agent's own env neither)
    assert LLM_KEY not in exec_ok(api, vm_id, "env; cat /proc/1/environ")["stdout"]
    record(api.get("/v1/sandboxes"))
    get(api, vm_id)
    agent_logs(api, vm_id)
    assert SEEN and not [body for body in SEEN if LLM_KEY in body]
    key = LLM_KEY.encode()
    assert key not in agent_server.log_path.read_bytes()
    db = agent_server.data_dir / "sandboxd.db"
    with sqlite3.connect(db) as conn:  # make sure what was written is in the main file
        conn.execute("PRAGMA wal_checkpoint(FULL)")
    for path in agent_server.data_dir.glob("sandboxd.db*"):
        assert key not in path.read_bytes(), path
    searched = 0
    for path in _files_under(agent_server.data_dir):
        searched += 1
        try:
            data = path.read_bytes()
        except OSError:
            continue
        assert key not in data, path
    assert searched > 0
