"""Exec options, streaming exec (SSE), background processes and the PTY WebSocket, driven
through the public API with real clients (httpx, websockets)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.helpers import assert_error, exec_ok, wait_for

pytestmark = pytest.mark.timeout(300)

SSE = {"Accept": "text/event-stream"}


def sse_events(response):
    """(event, data, arrival time) for each Server-Sent Event of a streamed response."""
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if event is not None:
                yield event, json.loads("\n".join(data)), time.monotonic()
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def processes_running(client, vm_id: str, needle: str) -> bool:
    ps = exec_ok(client, vm_id, "ps -eo args")["stdout"]
    return any(needle in line and "ps -eo" not in line for line in ps.splitlines())


def ws_url(server, vm_id: str, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sandboxes/{vm_id}/pty" + (f"?{query}" if query else "")


def read_until(ws, needle: bytes, timeout: float = 10.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, bytes):
            seen += message
    return seen


# --- exec options ------------------------------------------------------------------------


def test_exec_stdin_is_fed_and_closed(alice, sandbox):
    result = exec_ok(alice, sandbox, "cat; echo; wc -c", stdin="hello\nworld")
    assert result["stdout"].startswith("hello\nworld\n")
    assert result["exit_code"] == 0


def test_exec_large_stdin_does_not_deadlock(alice, sandbox):
    data = "x" * 300_000
    result = exec_ok(alice, sandbox, "wc -c", stdin=data)
    assert result["stdout"].strip() == "300000"


def test_exec_as_user(alice, sandbox):
    result = exec_ok(alice, sandbox, 'id -u; id -g; echo "$HOME $USER"; whoami', user="user")
    assert result["stdout"].split("\n")[:4] == ["1000", "1000", "/home/user user", "user"]
    assert exec_ok(alice, sandbox, "id -u")["stdout"] == "0\n"  # the default stays root


def test_exec_as_user_cannot_touch_root_files(alice, sandbox):
    result = exec_ok(alice, sandbox, "touch /etc/nope", user="user")
    assert result["exit_code"] != 0 and "Permission denied" in result["stderr"]


def test_exec_cwd_and_env(alice, sandbox):
    result = exec_ok(alice, sandbox, 'pwd; echo "$GREETING"', cwd="/tmp", env={"GREETING": "hi there"})
    assert result["stdout"] == "/tmp\nhi there\n"
    assert result["output"] == result["stdout"]


def test_exec_timeout_kills_other_groups_of_its_session(alice, sandbox):
    # a child in a process group of its own (as job control would make) must die too
    own_group = "python3 -c 'import os, time; os.setpgid(0, 0); time.sleep(1501.5)'"
    result = exec_ok(alice, sandbox, f"{own_group} & sleep 1502.5", timeout_seconds=1)
    assert result["timed_out"] is True and result["exit_code"] == 137
    assert not processes_running(alice, sandbox, "1501.5")
    assert not processes_running(alice, sandbox, "sleep 1502.5")


def test_blocking_exec_client_disconnect_kills_the_command(server, alice, sandbox):
    with httpx.Client(base_url=server.url, headers=alice.headers, timeout=2) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": "sleep 4321.5", "timeout_seconds": 600})
    wait_for(lambda: not processes_running(alice, sandbox, "sleep 4321.5"), timeout=15, interval=0.3)


# --- streaming ---------------------------------------------------------------------------


def test_sse_streams_chunks_before_exit(alice, sandbox):
    start = time.monotonic()
    with alice.stream(
        "POST", f"/v1/sandboxes/{sandbox}/exec", headers=SSE,
        json={"command": "echo a; sleep 1; echo b >&2; exit 3"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    kinds = [e[0] for e in events]
    assert kinds == ["stdout", "stderr", "exit"], events
    assert events[0][1]["data"] == "a\n" and events[1][1]["data"] == "b\n"
    assert events[2][1]["exit_code"] == 3 and events[2][1]["timed_out"] is False
    first, exit_at = events[0][2], events[2][2]
    assert exit_at - first >= 0.7, "the first chunk must arrive while the command still runs"
    assert first - start < exit_at - start - 0.7


def test_sse_large_output_is_complete_and_ordered(alice, sandbox):
    with alice.stream(
        "POST", f"/v1/sandboxes/{sandbox}/exec", headers=SSE, json={"command": "seq 1 400000"}
    ) as response:
        events = list(sse_events(response))
    out = "".join(e[1]["data"] for e in events if e[0] == "stdout")
    assert out == "".join(f"{i}\n" for i in range(1, 400001))
    assert events[-1][0] == "exit" and events[-1][1]["exit_code"] == 0


def test_sse_timeout_kills_and_reports(alice, sandbox):
    with alice.stream(
        "POST", f"/v1/sandboxes/{sandbox}/exec", headers=SSE,
        json={"command": "echo go; sleep 1111.5", "timeout_seconds": 1},
    ) as response:
        events = list(sse_events(response))
    assert events[-1][0] == "exit"
    assert events[-1][1]["timed_out"] is True and events[-1][1]["exit_code"] == 137
    assert not processes_running(alice, sandbox, "sleep 1111.5")


def test_sse_client_disconnect_kills_the_command(server, alice, sandbox):
    with httpx.Client(base_url=server.url, headers=alice.headers, timeout=30) as client:
        with client.stream(
            "POST", f"/v1/sandboxes/{sandbox}/exec", headers=SSE,
            json={"command": "echo started; sleep 1234.5", "timeout_seconds": 600},
        ) as response:
            event, data, _ = next(sse_events(response))
            assert (event, data["data"]) == ("stdout", "started\n")
            assert processes_running(alice, sandbox, "sleep 1234.5")
        # leaving the block closes the connection mid-stream
    wait_for(lambda: not processes_running(alice, sandbox, "sleep 1234.5"), timeout=15, interval=0.3)


def test_sse_exec_errors_are_json_before_streaming(alice, sandbox):
    response = alice.post(f"/v1/sandboxes/{sandbox}/exec", headers=SSE, json={"command": "true", "user": "nosuch"})
    assert_error(response, 400, "unknown_user", "user")
    response = alice.post(f"/v1/sandboxes/{sandbox}/exec", headers=SSE, json={"command": "true", "cwd": "/nonexistent"})
    assert_error(response, 400, "cwd_not_found", "cwd")


def exec_ws_url(server, vm_id: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sandboxes/{vm_id}/exec"


def test_websocket_exec_streams_then_exits(server, alice, sandbox):
    headers = {"Authorization": alice.headers["authorization"]}
    with connect(exec_ws_url(server, sandbox), additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"command": "echo a; sleep 0.5; echo b >&2", "user": "user"}))
        events = []
        try:
            while True:
                events.append((json.loads(ws.recv(timeout=10)), time.monotonic()))
        except ConnectionClosed:
            pass
    kinds = [(e["type"], e.get("data")) for e, _ in events]
    assert kinds == [("stdout", "a\n"), ("stderr", "b\n"), ("exit", None)], kinds
    assert events[-1][0]["exit_code"] == 0
    assert events[-1][1] - events[0][1] >= 0.3


def test_websocket_exec_errors_and_disconnect(server, alice, sandbox):
    headers = {"Authorization": alice.headers["authorization"]}
    with connect(exec_ws_url(server, sandbox), additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"command": "true", "user": 5}))
        message = json.loads(ws.recv(timeout=10))
        assert message["type"] == "error" and message["error"]["field"] == "user"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 4400
    with connect(exec_ws_url(server, sandbox), additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"command": "echo up; sleep 3456.5", "timeout_seconds": 600}))
        assert json.loads(ws.recv(timeout=10))["data"] == "up\n"
    wait_for(lambda: not processes_running(alice, sandbox, "sleep 3456.5"), timeout=15, interval=0.3)


# --- background processes ------------------------------------------------------------------


def test_background_start_list_stdin_output_signal_wait(alice, sandbox):
    base = f"/v1/sandboxes/{sandbox}/processes"
    response = alice.post(
        f"/v1/sandboxes/{sandbox}/exec",
        json={"command": "read line; echo got $line; echo oops >&2; sleep 600", "background": True},
    )
    assert response.status_code == 202, response.text
    proc = response.json()
    pid = proc["process_id"]
    assert proc["state"] == "running" and proc["background"] is True and proc["user"] == "root"

    listing = alice.get(base).json()["processes"]
    assert pid in [p["process_id"] for p in listing]

    response = alice.post(f"{base}/{pid}/stdin", json={"data": "hi\n"})
    assert response.status_code == 200, response.text
    out = wait_for(lambda: (o := alice.get(f"{base}/{pid}/output").json())["stderr"] and o, timeout=10)
    assert out["stdout"] == "got hi\n" and out["stderr"] == "oops\n"
    assert out["output"] == "got hi\noops\n" and out["state"] == "running"
    assert out["next_offset"] == len("got hi\noops\n")

    # reading from an offset returns only what came after it
    tail = alice.get(f"{base}/{pid}/output", params={"since_offset": 4}).json()
    assert tail["output"] == "hi\noops\n"

    # a follower sees the backlog; disconnecting it leaves the process running
    with alice.stream("GET", f"{base}/{pid}/output", params={"follow": "true"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        assert next(events)[:2] == ("stdout", {"data": "got hi\n", "offset": 0})
        assert next(events)[:2] == ("stderr", {"data": "oops\n", "offset": 7})
    time.sleep(0.5)
    assert alice.get(f"{base}/{pid}").json()["state"] == "running"

    response = alice.post(f"{base}/{pid}/wait", params={"timeout_seconds": 0.5})
    assert response.status_code == 200 and response.json()["state"] == "running"

    response = alice.post(f"{base}/{pid}/signal", json={"signal": "SIGTERM"})
    assert response.status_code == 200, response.text
    done = alice.post(f"{base}/{pid}/wait", params={"timeout_seconds": 10}).json()
    assert done["state"] == "exited" and done["exit_code"] == 128 + 15 and done["timed_out"] is False

    assert_error(alice.post(f"{base}/{pid}/signal", json={"signal": "SIGINT"}), 409, "process_exited")
    assert_error(alice.post(f"{base}/{pid}/stdin", json={"data": "x"}), 409)


def test_background_follow_streams_live_output_until_exit(alice, sandbox):
    pid = alice.post(
        f"/v1/sandboxes/{sandbox}/exec",
        json={"command": "for i in 1 2 3; do echo $i; sleep 0.3; done", "background": True},
    ).json()["process_id"]
    with alice.stream("GET", f"/v1/sandboxes/{sandbox}/processes/{pid}/output", params={"follow": "true"}) as r:
        events = list(sse_events(r))
    assert "".join(e[1]["data"] for e in events if e[0] == "stdout") == "1\n2\n3\n"
    assert events[-1][0] == "exit" and events[-1][1]["exit_code"] == 0


def test_background_raw_stdin_and_eof(alice, sandbox):
    base = f"/v1/sandboxes/{sandbox}/processes"
    pid = alice.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": "wc -c", "background": True}).json()["process_id"]
    response = alice.post(f"{base}/{pid}/stdin", content=b"12345", headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    response = alice.post(f"{base}/{pid}/stdin", json={"data": "678", "eof": True})
    assert response.status_code == 200 and response.json()["stdin_open"] is False
    done = alice.post(f"{base}/{pid}/wait", params={"timeout_seconds": 10}).json()
    assert done["state"] == "exited" and done["exit_code"] == 0
    assert alice.get(f"{base}/{pid}/output").json()["stdout"].strip() == "8"


def test_background_timeout_kills_the_whole_group(alice, sandbox):
    base = f"/v1/sandboxes/{sandbox}/processes"
    pid = alice.post(
        f"/v1/sandboxes/{sandbox}/exec",
        json={"command": "sleep 1001.5 & sleep 1002.5", "background": True, "timeout_seconds": 1},
    ).json()["process_id"]
    done = alice.post(f"{base}/{pid}/wait", params={"timeout_seconds": 20}).json()
    assert done["state"] == "exited" and done["timed_out"] is True and done["exit_code"] == 137
    assert not processes_running(alice, sandbox, "sleep 100")


def test_background_process_keeps_an_idle_sandbox_alive(alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 2}).json()["vm_id"]
    try:
        pid = alice.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": "sleep 600", "background": True}).json()
        time.sleep(5)  # > idle timeout, several reaper passes
        assert alice.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "running"
        alice.post(f"/v1/sandboxes/{vm_id}/processes/{pid['process_id']}/signal", json={"signal": "SIGKILL"})
        wait_for(lambda: alice.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "destroyed", timeout=20)
        assert alice.get(f"/v1/sandboxes/{vm_id}").json()["reason"] == "idle_timeout"
    finally:
        alice.delete(f"/v1/sandboxes/{vm_id}")


def test_background_as_user(alice, sandbox):
    pid = alice.post(
        f"/v1/sandboxes/{sandbox}/exec", json={"command": "id -u; echo $HOME", "background": True, "user": "user"}
    ).json()["process_id"]
    alice.post(f"/v1/sandboxes/{sandbox}/processes/{pid}/wait", params={"timeout_seconds": 10})
    assert alice.get(f"/v1/sandboxes/{sandbox}/processes/{pid}/output").json()["stdout"] == "1000\n/home/user\n"


# --- PTY ---------------------------------------------------------------------------------


def test_pty_resize_input_output_exit(server, alice, sandbox):
    headers = {"Authorization": alice.headers["authorization"]}
    with connect(ws_url(server, sandbox, "cols=80&rows=24"), additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
        ws.send(b"stty size\n")
        assert b"45 123" in read_until(ws, b"45 123")
        ws.send(json.dumps({"type": "input", "data": "echo h''i\n"}))
        assert b"hi\r\n" in read_until(ws, b"hi\r\n")
        ws.send(b"exit 7\n")
        exit_message = None
        try:
            while exit_message is None:
                message = ws.recv(timeout=10)
                if isinstance(message, str):
                    exit_message = json.loads(message)
        except ConnectionClosed:
            pass
        assert exit_message == {"type": "exit", "exit_code": 7}


def test_pty_as_user_with_api_key_query(server, alice, sandbox):
    key = alice.headers["authorization"].split(" ", 1)[1]
    with connect(ws_url(server, sandbox, f"api_key={key}&user=user&command=id%20-un%3B%20pwd"), open_timeout=30) as ws:
        out = read_until(ws, b"/home/user")
        assert b"user\r\n/home/user" in out


def test_pty_close_kills_its_processes(server, alice, sandbox):
    headers = {"Authorization": alice.headers["authorization"]}
    with connect(ws_url(server, sandbox), additional_headers=headers, open_timeout=30) as ws:
        ws.send(b"sleep 2345.5 & sleep 2346.5\n")
        wait_for(lambda: processes_running(alice, sandbox, "sleep 2346.5"), timeout=10, interval=0.2)
    wait_for(lambda: not processes_running(alice, sandbox, "sleep 234"), timeout=15, interval=0.3)


def test_pty_refusals_are_json(server, alice, bob, sandbox):
    def refused(url, headers=None):
        with pytest.raises(InvalidStatus) as info:
            with connect(url, additional_headers=headers or {}, open_timeout=30):
                pass
        response = info.value.response
        return response.status_code, json.loads(response.body)

    auth = {"Authorization": alice.headers["authorization"]}
    status, body = refused(ws_url(server, sandbox))
    assert status == 401 and body["error"]["field"] == "authorization"
    status, body = refused(ws_url(server, sandbox, "cols=0"), auth)
    assert status == 400 and body["error"]["field"] == "cols"
    status, body = refused(ws_url(server, sandbox, "user=nosuch"), auth)
    assert status == 400 and body["error"]["field"] == "user"
    status, body = refused(ws_url(server, sandbox), {"Authorization": bob.headers["authorization"]})
    assert status == 404 and body["error"]["code"] == "sandbox_not_found"


# --- bad inputs and tenancy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({"command": "true", "user": "nosuch"}, "unknown_user", "user"),
        ({"command": "true", "user": "Root!"}, None, "user"),
        ({"command": "true", "user": 0}, "invalid_type", "user"),
        ({"command": "true", "stdin": 5}, "invalid_type", "stdin"),
        ({"command": "true", "background": "yes"}, "invalid_type", "background"),
        ({"command": "true", "background": True, "timeout_seconds": 0}, None, "timeout_seconds"),
        ({"command": "true", "background": True, "user": "nosuch"}, "unknown_user", "user"),
        ({"command": "true", "cwd": "/nonexistent"}, "cwd_not_found", "cwd"),
    ],
)
def test_exec_bad_inputs(alice, sandbox, body, code, field):
    assert_error(alice.post(f"/v1/sandboxes/{sandbox}/exec", json=body), 400, code, field)


def test_process_bad_inputs(alice, sandbox):
    base = f"/v1/sandboxes/{sandbox}/processes"
    assert_error(alice.get(f"{base}/proc_999999"), 404, "process_not_found", "process_id")
    assert_error(alice.get(f"{base}/nonsense/output"), 404, "process_not_found", "process_id")
    assert_error(alice.post(f"{base}/proc_999999/wait"), 404, "process_not_found")
    pid = alice.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": "sleep 30", "background": True}).json()["process_id"]
    try:
        assert_error(alice.post(f"{base}/{pid}/signal", json={"signal": "SIGBOGUS"}), 400, "invalid_signal", "signal")
        assert_error(alice.post(f"{base}/{pid}/signal", json={"signal": 9}), 400, "invalid_type", "signal")
        assert_error(alice.post(f"{base}/{pid}/signal", json={"sig": "TERM"}), 400, "unknown_field", "sig")
        assert_error(alice.post(f"{base}/{pid}/signal", content=b"{", headers={"Content-Type": "application/json"}),
                     400, "invalid_json")
        assert_error(alice.post(f"{base}/{pid}/stdin", json={"data": 1}), 400, "invalid_type", "data")
        assert_error(alice.get(f"{base}/{pid}/output", params={"since_offset": -1}), 400, field="since_offset")
        assert_error(alice.post(f"{base}/{pid}/wait", params={"timeout_seconds": 1000}), 400, field="timeout_seconds")
        assert_error(alice.get(f"{base}/{pid}/output", params={"follow": "maybe"}), 400, field="follow")
    finally:
        alice.post(f"{base}/{pid}/signal", json={"signal": "KILL"})


def test_other_tenants_get_404(alice, bob, sandbox):
    pid = alice.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": "sleep 30", "background": True}).json()["process_id"]
    base = f"/v1/sandboxes/{sandbox}/processes"
    try:
        for response in (
            bob.get(base),
            bob.get(f"{base}/{pid}"),
            bob.get(f"{base}/{pid}/output"),
            bob.post(f"{base}/{pid}/signal", json={"signal": "SIGKILL"}),
            bob.post(f"{base}/{pid}/stdin", json={"data": "x"}),
            bob.post(f"{base}/{pid}/wait"),
            bob.post(f"/v1/sandboxes/{sandbox}/exec", headers=SSE, json={"command": "true"}),
            bob.post(f"/v1/sandboxes/{sandbox}/exec", json={"command": "true", "background": True}),
        ):
            assert_error(response, 404, "sandbox_not_found")
        assert alice.get(f"{base}/{pid}").json()["state"] == "running"
    finally:
        alice.post(f"{base}/{pid}/signal", json={"signal": "KILL"})


def test_pty_over_plain_http_is_426_and_documented(alice, sandbox, server):
    assert_error(alice.get(f"/v1/sandboxes/{sandbox}/pty"), 426, "websocket_required")
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    for path in ("/processes", "/processes/{process_id}", "/processes/{process_id}/output",
                 "/processes/{process_id}/stdin", "/processes/{process_id}/signal",
                 "/processes/{process_id}/wait", "/pty"):  # fmt: skip
        assert "/v1/sandboxes/{vm_id}" + path in paths, path
    exec_op = paths["/v1/sandboxes/{vm_id}/exec"]["post"]
    assert "text/event-stream" in exec_op["responses"]["200"]["content"]
    assert "202" in exec_op["responses"]
