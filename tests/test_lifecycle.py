"""Reaping (idle, lifetime) and restarts: nothing is forgotten, nothing leaks."""

from __future__ import annotations

import pytest

from tests.helpers import TEST_RUNTIME, Server, exec_ok, host_leaks, kill_sandbox, wait_for


def state_of(client, vm_id):
    return client.get(f"/v1/sandboxes/{vm_id}").json()


def test_idle_sandbox_is_reaped_and_activity_keeps_it(alice):
    idle = alice.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 2}).json()["vm_id"]
    busy = alice.post("/v1/sandboxes", json={"template": "standard", "idle_timeout_seconds": 2}).json()["vm_id"]
    try:
        # a command running longer than the idle timeout keeps its sandbox alive
        assert exec_ok(alice, busy, "sleep 4; echo done")["output"] == "done\n"
        body = wait_for(lambda: (s := state_of(alice, idle))["state"] == "destroyed" and s, timeout=20)
        assert body["reason"] == "idle_timeout"
        assert state_of(alice, busy)["state"] == "running"
        wait_for(lambda: state_of(alice, busy)["state"] == "destroyed", timeout=20)
        assert state_of(alice, busy)["reason"] == "idle_timeout"
        assert not [leak for leak in host_leaks() if idle in leak or busy in leak]
    finally:
        alice.delete(f"/v1/sandboxes/{idle}")
        alice.delete(f"/v1/sandboxes/{busy}")


def test_sandbox_past_its_lifetime_is_destroyed_even_when_busy(alice):
    vm_id = alice.post(
        "/v1/sandboxes", json={"template": "standard", "max_lifetime_seconds": 3, "idle_timeout_seconds": 60}
    ).json()["vm_id"]
    try:
        exec_ok(alice, vm_id, "nohup sleep 600 >/dev/null 2>&1 &")
        body = wait_for(lambda: (s := state_of(alice, vm_id))["state"] == "destroyed" and s, timeout=20)
        assert body["reason"] == "max_lifetime"
        assert vm_id not in {item["vm_id"] for item in alice.get("/v1/sandboxes").json()}
    finally:
        alice.delete(f"/v1/sandboxes/{vm_id}")


def test_sandbox_whose_init_dies_is_marked_lost_and_cleaned_up(alice):
    vm_id = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    try:
        kill_sandbox(vm_id)
        body = wait_for(lambda: (s := state_of(alice, vm_id))["state"] == "destroyed" and s, timeout=20)
        assert body["reason"] == "lost"
        assert not [leak for leak in host_leaks() if vm_id in leak]
    finally:
        alice.delete(f"/v1/sandboxes/{vm_id}")


@pytest.mark.parametrize("runtime", ["crun", "runc"] if TEST_RUNTIME == "oci" else [TEST_RUNTIME])
def test_kill_9_restart_readopts_survivors_and_marks_the_dead_lost(runtime):
    srv = Server("--runtime", runtime, "--reaper-interval", "0.5").start()
    key = srv.create_key("frank")
    try:
        with srv.client(key) as client:
            survivor = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
            victim = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
            exec_ok(client, survivor, "echo kept > /workspace/state")
        srv.kill()
        kill_sandbox(victim)  # dies while nobody watches
        srv.start()
        with srv.client(key) as client:
            assert state_of(client, survivor)["state"] == "running"
            assert exec_ok(client, survivor, "cat /workspace/state")["output"] == "kept\n"
            lost = state_of(client, victim)
            assert lost["state"] == "destroyed" and lost["reason"] == "lost"
            assert not [leak for leak in host_leaks() if victim in leak]
            assert client.delete(f"/v1/sandboxes/{survivor}").status_code == 200
    finally:
        srv.kill()
        srv.start()
        srv.destroy_all([key])
        srv.stop()
        srv.remove_data()


@pytest.mark.only_runtimes("oci")  # the others reach their agent over TCP, not a socket in the sandbox
def test_restart_does_not_follow_a_socket_symlink_planted_inside(host_unix_listener):
    host_socket, listener = host_unix_listener
    listener.settimeout(0.5)
    srv = Server().start()
    key = srv.create_key("grace")
    try:
        with srv.client(key) as client:
            vm_id = client.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
            swap = f"rm -f /run/sandboxd/agent.sock && ln -s {host_socket} /run/sandboxd/agent.sock"
            exec_ok(client, vm_id, swap)
        srv.kill()
        srv.start()
        with srv.client(key) as client:
            # its agent can no longer be reached by name: the sandbox is lost, not hijacked
            body = state_of(client, vm_id)
            assert body["state"] == "destroyed" and body["reason"] == "lost"
        with pytest.raises(TimeoutError):
            listener.accept()
        assert not [leak for leak in host_leaks() if vm_id in leak]
    finally:
        srv.destroy_all([key])
        srv.stop()
        srv.remove_data()
