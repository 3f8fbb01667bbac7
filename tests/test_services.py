"""Template services in the guest agent, run on the host (no container): start at boot,
restart policies with backoff, readiness (tcp, http, command), /services and
/services/wait, logs with source "service", not counted as running commands."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sandboxd.guest as guest_pkg
from sandboxd.guest.client import GuestClient
from sandboxd.guest.protocol import PROTOCOL_VERSION
from tests.helpers import free_port, wait_for

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

AGENT = Path(guest_pkg.__file__).resolve().parent / "agent.py"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


class ServiceAgent:
    def __init__(self, tmp_path: Path, services: list[dict]):
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir()
        self.token = secrets.token_hex(16)
        (self.run_dir / "boot.json").write_text(json.dumps({
            "protocol": PROTOCOL_VERSION, "vm_id": "sbx_svctest1", "token": self.token, "env": {"FROM_BOOT": "b"},
            "services": services,
        }))  # fmt: skip
        self.stderr = open(tmp_path / "agent.stderr", "wb")
        self.proc = subprocess.Popen(
            [PY, "-s", "-B", str(AGENT), "--run-dir", str(self.run_dir), "--workspace", str(tmp_path / "ws")],
            stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr, cwd="/",
        )  # fmt: skip
        self.call(lambda c: c.wait_ready(10))

    def call(self, fn):
        async def go():
            async with GuestClient(str(self.run_dir / "agent.sock"), self.token) as c:
                return await fn(c)

        return asyncio.run(go())

    def get(self, path: str, **params):
        return self.call(lambda c: c.proc_call("GET", path, params=params or None, timeout=60))

    def logs(self) -> list[dict]:
        return self.call(lambda c: c.logs(limit=10000))["entries"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture
def make_agent(tmp_path):
    agents = []

    def make(services):
        path = tmp_path / f"agent{len(agents)}"
        path.mkdir()
        agent = ServiceAgent(path, services)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_services_start_restart_and_get_ready(make_agent, tmp_path):
    port = free_port()
    marker = tmp_path / "marker"
    agent = make_agent([
        {"name": "web", "command": f"exec {PY} -m http.server --bind 127.0.0.1 {port}", "restart": "always",
         "readiness": {"http_url": f"http://127.0.0.1:{port}/", "timeout_seconds": 10}},
        {"name": "flaky", "command": "echo flaky-run $FROM_BOOT $SVC_VAR; exit 1", "restart": "on-failure",
         "env": {"SVC_VAR": "s"}},
        {"name": "once", "command": "echo done-once", "restart": "no"},
        {"name": "cmd", "command": f"sleep 0.5; touch {marker}; exec sleep 1000",
         "readiness": {"command": f"test -e {marker}", "timeout_seconds": 10}},
        {"name": "tcp", "command": f"exec {PY} -c \"import socket,time; s=socket.create_server(('127.0.0.1',{port + 1 if port < 65535 else port - 1})); time.sleep(1000)\"",
         "readiness": {"tcp_port": port + 1 if port < 65535 else port - 1, "timeout_seconds": 10}},
    ])  # fmt: skip
    doc = agent.get("/services/wait", timeout=20)
    assert doc["ready"] is True and doc["failed"] is None, doc
    by_name = {s["name"]: s for s in doc["services"]}
    assert by_name["web"]["state"] == "running" and by_name["web"]["pid"]
    assert by_name["cmd"]["ready_after_seconds"] >= 0.5

    # on-failure: restarted with a growing backoff (0.5 s, 1 s, ...); "no": left exited
    flaky = wait_for(lambda: (s := {x["name"]: x for x in agent.get("/services")["services"]})["flaky"]["restarts"] >= 2
                     and s, timeout=10)
    assert flaky["flaky"]["last_exit_code"] == 1
    assert flaky["once"]["state"] == "exited" and flaky["once"]["restarts"] == 0

    # services are the template's daemons, not commands: they never keep the sandbox busy
    status = agent.call(lambda c: c.status())
    assert status["running_commands"] == 0 and status["running_services"] >= 3
    assert agent.get("/procs")["processes"] == []

    service_lines = [(e["stream"], e["text"]) for e in agent.logs() if e["source"] == "service"]
    assert ("stdout", "flaky-run b s") in service_lines
    assert ("stdout", "done-once") in service_lines
    assert any(t.startswith("service web is ready after") for _s, t in service_lines)
    assert ("system", "service flaky exited with code 1") in service_lines

    # an "always" service comes back after it is killed
    pid = by_name["web"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (w := {x["name"]: x for x in agent.get("/services")["services"]}["web"])["restarts"] >= 1
             and w["state"] == "running" and w["pid"] != pid, timeout=10)

    # the agent's shutdown takes its services along
    pids = [s["pid"] for s in agent.get("/services")["services"] if s["pid"]]
    agent.stop()
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=10)


def test_service_never_ready_and_exited_before_ready(make_agent):
    agent = make_agent([
        {"name": "slow", "command": "exec sleep 1000", "readiness": {"tcp_port": 1, "timeout_seconds": 1}},
    ])
    t0 = time.monotonic()
    doc = agent.get("/services/wait", timeout=30)
    assert time.monotonic() - t0 < 5
    assert doc["ready"] is False and doc["failed"] == "slow"
    slow = doc["services"][0]
    assert slow["state"] == "failed" and "not ready after 1s" in slow["error"]

    other = make_agent([
        {"name": "quitter", "command": "echo bye; exit 2", "restart": "no",
         "readiness": {"tcp_port": 1, "timeout_seconds": 30}},
    ])
    t0 = time.monotonic()
    doc = other.get("/services/wait", timeout=30)
    assert time.monotonic() - t0 < 5  # no need to wait out the readiness timeout
    assert doc["ready"] is False and doc["failed"] == "quitter"
    assert "exited with code 2 before it was ready" in doc["services"][0]["error"]


def test_wait_without_services_and_bad_timeout(make_agent):
    agent = make_agent([])
    assert agent.get("/services/wait", timeout=0) == {"ready": True, "failed": None, "services": []}
    from sandboxd.guest.client import GuestError

    with pytest.raises(GuestError) as err:
        agent.get("/services/wait", timeout=-1)
    assert err.value.status == 400
