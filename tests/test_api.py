"""The spec's seven endpoints: shapes, defaults, and every error row of its tables."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from tests.helpers import TEST_RUNTIME, Server, assert_error, cli, exec_ok, host_leaks

VM_ID = re.compile(r"^sbx_[a-z0-9]{8}$")


# --- create ---------------------------------------------------------------------------


def test_create_answers_spec_shape_and_sandbox_is_running(alice, server):
    response = alice.post("/v1/sandboxes", json={"template": "standard", "metadata": {"tag": "prod"}})
    assert response.status_code == 201, response.text
    body = response.json()
    try:
        assert set(body) == {"vm_id", "state", "host_port", "endpoint"}
        assert VM_ID.match(body["vm_id"])
        assert body["state"] == "running"
        assert isinstance(body["host_port"], int) and 1024 < body["host_port"] < 65536
        assert body["endpoint"] == f"http://127.0.0.1:{body['host_port']}"
        # 201 means the guest agent answers: exec works at once
        assert exec_ok(alice, body["vm_id"], "echo ready")["output"] == "ready\n"
    finally:
        alice.delete(f"/v1/sandboxes/{body['vm_id']}")


def test_get_shows_spec_fields_and_defaults(alice, sandbox):
    body = alice.get(f"/v1/sandboxes/{sandbox}").json()
    assert body["vm_id"] == sandbox
    assert body["state"] == "running"
    assert (body["vcpu"], body["cpu_fraction"], body["memory_mib"]) == (1, 0.5, 512)
    assert body["rootfs"].startswith("standard")
    assert body["metadata"] == {}
    assert body["idle_timeout_seconds"] == 60
    assert body["max_lifetime_seconds"] == 7200
    assert "agent_status" not in body and "agent_exit_code" not in body


def test_list_shows_only_own_live_sandboxes_with_user_id(alice, bob, server):
    created = alice.post("/v1/sandboxes", json={"template": "standard", "metadata": {"tag": "prod"}}).json()
    try:
        listing = alice.get("/v1/sandboxes")
        assert listing.status_code == 200
        items = {item["vm_id"]: item for item in listing.json()}
        item = items[created["vm_id"]]
        assert set(item) == {"vm_id", "state", "vcpu", "cpu_fraction", "memory_mib", "runtime", "metadata"}
        assert item["runtime"] == TEST_RUNTIME
        assert item["metadata"]["tag"] == "prod"
        assert item["metadata"]["user_id"].startswith("usr_")
        assert created["vm_id"] not in {i["vm_id"] for i in bob.get("/v1/sandboxes").json()}
    finally:
        alice.delete(f"/v1/sandboxes/{created['vm_id']}")
    assert created["vm_id"] not in {i["vm_id"] for i in alice.get("/v1/sandboxes").json()}


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({}, "missing_field", "template"),
        ({"template": 7}, "invalid_type", "template"),
        ({"template": "standard", "env_vars": {"LD_PRELOAD": "/x.so"}}, "reserved_env_var", "env_vars"),
        ({"template": "standard", "env_vars": {"SANDBOXD_TOKEN": "x"}}, "reserved_env_var", "env_vars"),
        ({"template": "standard", "env_vars": {"HOSTNAME": "x"}}, "reserved_env_var", "env_vars"),
        ({"template": "standard", "env_vars": {"1BAD": "x"}}, "invalid_env_var", "env_vars"),
        ({"template": "standard", "env_vars": {"A": 1}}, "invalid_type", "env_vars.A"),
        ({"template": "standard", "env_vars": ["A=1"]}, "invalid_type", "env_vars"),
        ({"template": "standard", "agent": "claude-code"}, "missing_field", "llm_key"),
        ({"template": "standard", "agent": "deictic", "llm_key": "k"}, "missing_field", "model"),
        ({"template": "standard", "agent": "codex", "llm_key": "k", "model": "claude-x"}, "invalid_model", "model"),
        ({"template": "standard", "llm_key": "k"}, "agent_required", "llm_key"),
        ({"template": "standard", "max_lifetime_seconds": 7201}, "invalid_value", "max_lifetime_seconds"),
        ({"template": "standard", "max_lifetime_seconds": 0}, "invalid_value", "max_lifetime_seconds"),
        ({"template": "standard", "idle_timeout_seconds": -1}, "invalid_value", "idle_timeout_seconds"),
        ({"template": "standard", "idle_timeout_seconds": "60"}, "invalid_type", "idle_timeout_seconds"),
        ({"template": "standard", "idle_timeout_seconds": True}, "invalid_type", "idle_timeout_seconds"),
        ({"template": "standard", "metadata": "tag"}, "invalid_type", "metadata"),
        ({"template": "standard", "metadata": {"big": "x" * 20000}}, "metadata_too_large", "metadata"),
        ({"template": "standard", "metadata": {"user_id": "usr_x"}}, "reserved_metadata_key", "metadata"),
        ({"template": "standard", "idle_timeout": 5}, "unknown_field", "idle_timeout"),
    ],
)
def test_create_rejects_bad_input_with_400_naming_the_field(alice, body, code, field):
    assert_error(alice.post("/v1/sandboxes", json=body), 400, code, field)


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b"", b'"standard"', b"\xff\xfe"])
def test_create_rejects_malformed_bodies(alice, raw):
    response = alice.post("/v1/sandboxes", content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 400)


def test_create_rejects_huge_body(alice):
    response = alice.post("/v1/sandboxes", content=b'{"template": "' + b"x" * (2 << 20) + b'"}')
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({"template": "windows"}, "unknown_template", "template"),
        ({"template": "standard", "agent": "gpt-engineer", "llm_key": "k"}, "unknown_agent", "agent"),
    ],
)
def test_create_unknown_template_or_agent_is_501(alice, body, code, field):
    assert_error(alice.post("/v1/sandboxes", json=body), 501, code, field)


def test_bad_create_leaves_no_record(alice):
    before = {item["vm_id"] for item in alice.get("/v1/sandboxes").json()}
    alice.post("/v1/sandboxes", json={"template": "standard", "env_vars": {"LD_PRELOAD": "x"}})
    alice.post("/v1/sandboxes", json={"template": "nope"})
    assert {item["vm_id"] for item in alice.get("/v1/sandboxes").json()} == before


# --- auth and tenancy -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/sbx_00000000"),
        ("POST", "/v1/sandboxes/sbx_00000000/exec"),
        ("DELETE", "/v1/sandboxes/sbx_00000000"),
        ("GET", "/v1/sandboxes/sbx_00000000/logs"),
        ("POST", "/v1/sandboxes/sbx_00000000/cancel"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer sbd_wrong", "Basic abc", "Bearer", "bearer x y"])
def test_every_endpoint_requires_a_valid_key(server, method, path, header):
    with server.client(None) as client:
        headers = {"Authorization": header} if header else {}
        response = client.request(method, path, headers=headers, json={"template": "standard"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_revoked_key_is_refused(server):

    key = server.create_key("carol")
    with server.client(key) as client:
        assert client.get("/v1/sandboxes").status_code == 200
        listed = [json.loads(line) for line in cli("keys", "list", "--json", data_dir=server.data_dir).stdout.splitlines()]
        mine = next(entry for entry in listed if entry["user"] == "carol")
        assert key.startswith(mine["prefix"]) and key not in json.dumps(listed)  # only a prefix is kept
        cli("keys", "revoke", mine["key_id"], data_dir=server.data_dir)
        assert_error(client.get("/v1/sandboxes"), 401)
    assert cli("keys", "revoke", mine["key_id"], data_dir=server.data_dir, check=False).returncode == 1


def test_other_tenants_sandbox_is_404_everywhere(bob, sandbox):
    for method, path in [
        ("GET", f"/v1/sandboxes/{sandbox}"),
        ("POST", f"/v1/sandboxes/{sandbox}/exec"),
        ("DELETE", f"/v1/sandboxes/{sandbox}"),
        ("GET", f"/v1/sandboxes/{sandbox}/logs"),
        ("POST", f"/v1/sandboxes/{sandbox}/cancel"),
    ]:
        assert_error(bob.request(method, path, json={"command": "true"}), 404, "sandbox_not_found")


@pytest.mark.parametrize("vm_id", ["sbx_00000000", "nope", "sbx_../../etc", "SBX_ABCDEFGH"])
def test_unknown_sandbox_is_404(alice, vm_id):
    assert_error(alice.get(f"/v1/sandboxes/{vm_id}"), 404)
    assert_error(alice.delete(f"/v1/sandboxes/{vm_id}"), 404)


# --- exec -----------------------------------------------------------------------------


def test_exec_runs_in_workspace_and_reports_exit_code(alice, sandbox):
    body = exec_ok(alice, sandbox, "echo hello && pwd && test -d /workspace && echo /workspace")
    assert body["output"] == "hello\n/workspace\n/workspace\n"
    assert body["exit_code"] == 0 and body["timed_out"] is False and body["truncated"] is False
    failed = exec_ok(alice, sandbox, "echo out; echo err >&2; exit 3")
    assert failed["exit_code"] == 3
    assert failed["stdout"] == "out\n" and failed["stderr"] == "err\n"
    assert failed["output"] == "out\nerr\n"


def test_exec_sees_env_vars_given_at_create(alice):
    created = alice.post("/v1/sandboxes", json={"template": "standard", "env_vars": {"MY_VAR": "value"}}).json()
    try:
        assert exec_ok(alice, created["vm_id"], "echo $MY_VAR")["output"] == "value\n"
        assert exec_ok(alice, created["vm_id"], "echo $MY_VAR", env={"MY_VAR": "x"})["output"] == "x\n"
    finally:
        alice.delete(f"/v1/sandboxes/{created['vm_id']}")


def test_exec_timeout_kills_the_whole_process_group(alice, sandbox):
    body = exec_ok(alice, sandbox, "sleep 1000 & sleep 1000; echo never", timeout_seconds=1)
    assert body["timed_out"] is True
    assert body["exit_code"] == 137
    assert "never" not in body["output"]
    left = exec_ok(alice, sandbox, "ps -eo args | grep -c '^sleep 1000' || true")["output"].strip()
    assert left == "0"


def test_exec_output_over_the_cap_is_truncated(alice, sandbox):
    body = exec_ok(alice, sandbox, "head -c 3000000 /dev/zero | tr '\\0' a; echo; echo done >&2")
    assert body["truncated"] is True
    assert len(body["stdout"]) <= 1024 * 1024
    assert body["exit_code"] == 0


@pytest.mark.parametrize(
    "body, code, field",
    [
        ({}, "missing_field", "command"),
        ({"command": ""}, "invalid_value", "command"),
        ({"command": ["ls"]}, "invalid_type", "command"),
        ({"command": "true", "timeout_seconds": 0}, "invalid_value", "timeout_seconds"),
        ({"command": "true", "timeout_seconds": 100000}, "invalid_value", "timeout_seconds"),
        ({"command": "true", "timeout_seconds": "5"}, "invalid_type", "timeout_seconds"),
        ({"command": "true", "env": {"LD_PRELOAD": "x"}}, "reserved_env_var", "env"),
        ({"command": "true", "cwd": "/no/such/dir"}, "cwd_not_found", "cwd"),
        ({"command": "true", "shell": "bash"}, "unknown_field", "shell"),
    ],
)
def test_exec_rejects_bad_input(alice, sandbox, body, code, field):
    assert_error(alice.post(f"/v1/sandboxes/{sandbox}/exec", json=body), 400, code, field)


def test_exec_on_destroyed_sandbox_is_409(alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    alice.delete(f"/v1/sandboxes/{vm_id}")
    assert_error(alice.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": "true"}), 409, "sandbox_not_running")


# --- destroy --------------------------------------------------------------------------


def test_destroy_is_synchronous_and_leaves_a_destroyed_record(alice, server):

    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    response = alice.delete(f"/v1/sandboxes/{vm_id}")
    assert response.status_code == 200
    assert response.json() == {"vm_id": vm_id, "state": "destroyed"}
    assert not [leak for leak in host_leaks() if vm_id in leak]
    assert not (server.data_dir / "sandboxes" / vm_id).exists()
    body = alice.get(f"/v1/sandboxes/{vm_id}").json()
    assert body["state"] == "destroyed" and body["reason"] == "user_request"
    assert body["destroyed_at"]
    # idempotent: a second DELETE reports the same end state
    assert alice.delete(f"/v1/sandboxes/{vm_id}").json() == {"vm_id": vm_id, "state": "destroyed"}


# --- logs -----------------------------------------------------------------------------


def test_logs_hold_command_output_with_limit_and_since(alice, sandbox):
    exec_ok(alice, sandbox, "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2")
    response = alice.get(f"/v1/sandboxes/{sandbox}/logs")
    assert response.status_code == 200
    body = response.json()
    texts = [entry["text"] for entry in body["entries"]]
    assert texts[-6:] == ["line1", "line2", "line3", "line4", "line5", "oops"]
    entry = body["entries"][-1]
    assert set(entry) == {"ts", "stream", "source", "text"} and entry["stream"] == "stderr"
    last_two = alice.get(f"/v1/sandboxes/{sandbox}/logs", params={"limit": 2}).json()
    assert [e["text"] for e in last_two["entries"]] == ["line5", "oops"] and last_two["truncated"] is True
    mark = body["entries"][-1]["ts"]
    exec_ok(alice, sandbox, "echo after")
    newer = alice.get(f"/v1/sandboxes/{sandbox}/logs", params={"since": mark}).json()
    assert [e["text"] for e in newer["entries"]] == ["after"]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    assert alice.get(f"/v1/sandboxes/{sandbox}/logs", params={"since": future}).json()["entries"] == []


@pytest.mark.parametrize(
    "params, field",
    [({"since": "yesterday"}, "since"), ({"limit": "x"}, "limit"), ({"limit": 0}, "limit"), ({"limit": 10**6}, "limit")],
)
def test_logs_reject_bad_parameters(alice, sandbox, params, field):
    assert_error(alice.get(f"/v1/sandboxes/{sandbox}/logs", params=params), 400, field=field)


# --- cancel ---------------------------------------------------------------------------


def test_cancel_without_agent_is_409(alice, sandbox):
    assert_error(alice.post(f"/v1/sandboxes/{sandbox}/cancel"), 409, "no_running_agent")


# --- workers: 503 and 409 -------------------------------------------------------------


def test_no_workers_registered_is_503():
    srv = Server("--no-local-worker").start()
    try:
        key = srv.create_key("dave")
        with srv.client(key) as client:
            assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 503, "no_workers")
            assert client.get("/v1/sandboxes").json() == []
    finally:
        srv.stop()
        srv.remove_data()


def test_no_capacity_is_409_and_frees_up_after_destroy():
    # 1 CPU × overcommit 1 fits two 0.5-CPU standard sandboxes, not three
    srv = Server("--worker-vcpus", "1", "--cpu-overcommit", "1").start()
    try:
        key = srv.create_key("erin")
        with srv.client(key) as client:
            first = client.post("/v1/sandboxes", json={"template": "standard"})
            second = client.post("/v1/sandboxes", json={"template": "standard"})
            assert first.status_code == second.status_code == 201
            assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 409, "no_capacity")
            client.delete(f"/v1/sandboxes/{first.json()['vm_id']}")
            third = client.post("/v1/sandboxes", json={"template": "standard"})
            assert third.status_code == 201
        srv.destroy_all([key])
    finally:
        srv.stop()
        srv.remove_data()


# --- unknown routes keep the error shape ----------------------------------------------


def test_unknown_route_and_method_answer_json(alice):
    assert_error(alice.get("/v1/nope"), 404)
    assert_error(alice.put("/v1/sandboxes"), 405)


def test_openapi_schema_documents_the_endpoints(alice):
    paths = alice.get("/openapi.json").json()["paths"]
    assert {"/v1/sandboxes", "/v1/sandboxes/{vm_id}", "/v1/sandboxes/{vm_id}/exec",
            "/v1/sandboxes/{vm_id}/logs", "/v1/sandboxes/{vm_id}/cancel"} <= set(paths)  # fmt: skip

