"""Many hosts: three `sandboxd worker` processes, each in its own network namespace, under
two control planes sharing one PostgreSQL; placement, failures and recovery.

Grace periods are short here (heartbeat 0.3 s, down after 2 s, lost after 25 s, an abandoned
create after 15 s); every wait is a poll for a state, never a timing assertion.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.helpers import assert_error, exec_ok, host_leaks, wait_for
from tests.multihost_helpers import ControlPlane, Postgres, WorkerHost, listing
from tests.test_processes import read_until

# Workers run the default runtime: the placement and failure logic does not depend on it.
pytestmark = pytest.mark.runtime_independent

GRACE = {
    "SANDBOXD_HEARTBEAT_INTERVAL_SECONDS": "0.3",
    "SANDBOXD_WORKER_DOWN_AFTER_SECONDS": "2",
    "SANDBOXD_WORKER_LOST_AFTER_SECONDS": "25",
    "SANDBOXD_CREATE_TIMEOUT_SECONDS": "15",
}


class Cluster:
    def __init__(self):
        self.postgres = Postgres().start()
        self.cps = [ControlPlane(self.postgres.url, GRACE) for _ in range(2)]
        self.cps[0].start()  # migrates; the second finds the schema current
        self.cps[1].start()
        token = self.cps[0].create_worker_token("test hosts")
        self.workers = [WorkerHost(i, self.cps, token, env=GRACE).create_netns() for i in (1, 2, 3)]
        for worker in self.workers:
            worker.start()
        self.key = self.cps[0].create_key("alice")
        self.by_address = {w.address: w for w in self.workers}

    def client(self, cp: int = 0) -> httpx.Client:
        return self.cps[cp].client(self.key)

    def worker_of(self, client: httpx.Client, vm_id: str) -> WorkerHost:
        endpoint = client.get(f"/v1/sandboxes/{vm_id}").json()["endpoint"]
        return self.by_address[httpx.URL(endpoint).host]

    def restore(self) -> None:
        """Every worker up, linked and registered; every sandbox destroyed."""
        for worker in self.workers:
            worker.set_link(True)
            if worker.process.poll() is not None:
                worker.start()
        for cp in self.cps:
            if cp.process.poll() is not None:
                cp.start()
        with self.client() as client:
            wait_for(lambda: not listing(client)[1], timeout=60)
            for item in listing(client)[0]:
                client.delete(f"/v1/sandboxes/{item['vm_id']}")

    def remove(self) -> None:
        try:
            self.restore()
        finally:
            for worker in self.workers:
                worker.remove()
            for cp in self.cps:
                cp.stop()
                cp.remove_data()
            self.postgres.stop()


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster()
    yield cluster
    cluster.remove()


@pytest.fixture
def fresh(cluster):
    """Each test starts and ends with every worker healthy and no sandbox left."""
    yield cluster
    cluster.restore()


def create(client: httpx.Client, **extra) -> str:
    response = client.post("/v1/sandboxes", json={"template": "standard", **extra})
    assert response.status_code == 201, response.text
    return response.json()["vm_id"]


def state(client: httpx.Client, vm_id: str) -> dict:
    return client.get(f"/v1/sandboxes/{vm_id}").json()


def test_creates_spread_over_workers_and_either_control_plane_serves_them(fresh):
    with fresh.client(0) as cp1, fresh.client(1) as cp2:
        made = [create(cp1), create(cp2), create(cp1)]
        hosts = {fresh.worker_of(cp1, vm_id).address for vm_id in made}
        assert hosts == {w.address for w in fresh.workers}  # most free memory first: one each
        for vm_id in made:
            body = state(cp2, vm_id)
            assert body["state"] == "running"
            assert body["endpoint"] == f"http://{httpx.URL(body['endpoint']).host}:{body['host_port']}"
            assert exec_ok(cp2, vm_id, "hostname")["output"] == f"{vm_id}\n"
        # endpoint = the worker's advertised address + host_port, forwarded to the sandbox's 9090
        server = {"command": "cd /tmp && echo served > index.html && python3 -m http.server 9090", "background": True}
        assert cp1.post(f"/v1/sandboxes/{made[0]}/exec", json=server).status_code == 202
        endpoint = state(cp1, made[0])["endpoint"]
        assert wait_for(lambda: _get(endpoint + "/index.html"), timeout=20) == "served\n"
        # files and ports relay through the worker's API
        data = bytes(range(256)) * 4096
        assert cp2.put(f"/v1/sandboxes/{made[1]}/files", params={"path": "blob"}, content=data).status_code == 201
        assert cp1.get(f"/v1/sandboxes/{made[1]}/files", params={"path": "blob"}).content == data
        assert cp2.get(f"/v1/sandboxes/{made[0]}/ports/9090/index.html").text == "served\n"
        assert_error(cp2.get(f"/v1/sandboxes/{made[0]}/ports/9191/"), 502, "port_unreachable")
        items, partial = listing(cp1)
        assert not partial and {item["vm_id"] for item in items} == set(made)


def test_streams_and_terminals_relay_through_the_worker(fresh):
    """SSE exec, a PTY (resize, input, exit code) and a tar download, each crossing the
    control plane and the remote worker's API."""
    with fresh.client(0) as cp1, fresh.client(1) as cp2:
        vm_id = create(cp1)
        body = {"command": "echo out; echo err >&2; exit 3"}
        with cp2.stream("POST", f"/v1/sandboxes/{vm_id}/exec", json=body, headers={"Accept": "text/event-stream"}) as r:
            events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
            assert r.status_code == 200
        assert {"stdout", "stderr", "exit"} <= set(events), events
        url = fresh.cps[1].url.replace("http://", "ws://") + f"/v1/sandboxes/{vm_id}/pty?cols=80&rows=24"
        with connect(url, additional_headers={"Authorization": f"Bearer {fresh.key}"}, open_timeout=30) as ws:
            ws.send(json.dumps({"type": "resize", "cols": 101, "rows": 33}))
            ws.send(b"stty size\n")
            assert b"33 101" in read_until(ws, b"33 101")
            ws.send(b"exit 5\n")
            exits = []
            try:
                while not exits:
                    message = ws.recv(timeout=20)
                    if isinstance(message, str):
                        exits.append(json.loads(message))
            except ConnectionClosed:
                pass
            assert exits == [{"type": "exit", "exit_code": 5}]
        exec_ok(cp1, vm_id, "mkdir -p proj && echo a > proj/a && echo b > proj/b")
        tar = cp2.get(f"/v1/sandboxes/{vm_id}/files/download-tar", params={"path": "proj"})
        assert tar.status_code == 200 and b"a\n" in tar.content and b"b\n" in tar.content


def _get(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return response.text if response.status_code == 200 else None


def test_full_workers_answer_409_and_concurrent_creates_never_overfill(fresh):
    """Each worker offers 1024 MiB: two standard sandboxes. Eight creates at once through
    both control planes: six fit, two get 409, and no worker holds more than two."""
    clients = [fresh.client(i % 2) for i in range(8)]
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: c.post("/v1/sandboxes", json={"template": "standard"}), clients))
        made = [a.json()["vm_id"] for a in answers if a.status_code == 201]
        refused = [a for a in answers if a.status_code != 201]
        assert len(made) == 6, [a.text for a in refused]
        for answer in refused:
            assert_error(answer, 409, "no_capacity")
        per_worker = {}
        for vm_id in made:
            address = fresh.worker_of(clients[0], vm_id).address
            per_worker[address] = per_worker.get(address, 0) + 1
        assert per_worker == {w.address: 2 for w in fresh.workers}
        assert_error(clients[1].post("/v1/sandboxes", json={"template": "standard"}), 409, "no_capacity")
        rows = fresh.cps[0].workers()
        assert all(row["sandboxes"] == 2 and row["used_memory_mib"] == 1024 for row in rows.values())
    finally:
        for client in clients:
            client.close()


def test_draining_worker_gets_no_new_sandboxes(fresh):
    drained = fresh.workers[0]
    fresh.cps[1]._cli("workers", "drain", drained.worker_id)
    try:
        assert fresh.cps[0].workers()[drained.worker_id]["draining"] is True
        with fresh.client(0) as client:
            made = [create(client) for _ in range(4)]
            assert drained.address not in {fresh.worker_of(client, vm_id).address for vm_id in made}
            assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 409, "no_capacity")
    finally:
        fresh.cps[1]._cli("workers", "drain", drained.worker_id, "--undo")
    assert fresh.cps[0].workers()[drained.worker_id]["draining"] is False


def test_worker_and_control_plane_authenticate_each_other(fresh):
    cp = fresh.cps[0].url
    body = {"worker_id": fresh.workers[0].worker_id, "url": fresh.workers[0].url, "secret": "x" * 40}
    for headers in ({}, {"Authorization": "Bearer swt_not-a-token"}, {"Authorization": "Bearer " + fresh.key}):
        assert_error(httpx.post(f"{cp}/v1/workers/register", json=body, headers=headers), 401)
        assert_error(httpx.post(f"{cp}/v1/workers/heartbeat", json={"worker_id": "wrk_aaaaaaaa", "secret_sha256": "0"},
                                headers=headers), 401)  # fmt: skip
    # a revoked token registers nothing, and garbage is a 400, never a 500
    token = fresh.cps[0].create_worker_token("revoked")
    auth = {"Authorization": f"Bearer {token}"}
    assert_error(httpx.post(f"{cp}/v1/workers/register", content=b"{nope", headers=auth), 400, "invalid_json")
    assert_error(httpx.post(f"{cp}/v1/workers/register", json={**body, "url": "ftp://x"}, headers=auth), 400,
                 field="url")  # fmt: skip
    # a worker token cannot take over a worker registered with another live token
    assert_error(httpx.post(f"{cp}/v1/workers/register", json=body, headers=auth), 409, "worker_token_mismatch")
    fresh.cps[0]._cli("workers", "token", "revoke", token[:12])
    assert_error(httpx.post(f"{cp}/v1/workers/register", json=body, headers=auth), 401)
    # the worker answers only its control planes' secrets
    worker = fresh.workers[0].url
    assert_error(httpx.get(f"{worker}/worker/v1/info"), 401)
    assert_error(httpx.get(f"{worker}/worker/v1/sandboxes", headers={"X-Sandboxd-Worker-Key": "x" * 43}), 401)
    assert httpx.get(f"{worker}/healthz").status_code == 200


def test_sandbox_cannot_reach_its_worker_api(fresh):
    with fresh.client() as client:
        vm_id = create(client)
        worker = fresh.worker_of(client, vm_id)
        probe = (
            "import socket,sys\n"
            "s=socket.socket(); s.settimeout(3)\n"
            f"try: s.connect(('{worker.address}', 8081)); print('open')\n"
            "except OSError as e: print('blocked', type(e).__name__)\n"
        )
        result = exec_ok(client, vm_id, f"python3 -c \"{probe}\"")
        assert result["output"].startswith("blocked"), result
        assert httpx.get(f"{worker.url}/healthz").status_code == 200  # the host itself reaches it


def _wait_down_then_check(fresh, client, gone: WorkerHost, on_gone: str, others: list[str]) -> None:
    """While `gone` is away: list is partial without its sandbox, get says unknown, and new
    sandboxes go to the other workers."""
    def partial_listing():
        items, partial = listing(client)
        return partial and items

    items = wait_for(partial_listing, timeout=30)
    assert {item["vm_id"] for item in items} == set(others)
    assert state(client, on_gone)["state"] == "unknown"
    assert_error(client.post(f"/v1/sandboxes/{on_gone}/exec", json={"command": "true"}), 409, "sandbox_not_running")
    elsewhere = create(client)
    assert fresh.worker_of(client, elsewhere) is not gone
    client.delete(f"/v1/sandboxes/{elsewhere}")


@pytest.mark.parametrize("failure", ["sigkill", "link_down"])
def test_worker_failure_partial_unknown_then_readopted(fresh, failure):
    with fresh.client(0) as client, fresh.client(1) as other_cp:
        made = [create(client) for _ in range(3)]
        gone = fresh.worker_of(client, made[0])
        others = made[1:]
        exec_ok(client, made[0], "echo kept > /workspace/state")
        if failure == "sigkill":
            gone.kill()
        else:
            gone.set_link(False)
        _wait_down_then_check(fresh, client, gone, made[0], others)
        assert state(other_cp, made[0])["state"] == "unknown"
        if failure == "sigkill":
            gone.start()  # its own restart re-adopts the sandbox; registering reconciles the record
        else:
            gone.set_link(True)  # its heartbeat is refused (down): it registers again
        wait_for(lambda: state(client, made[0])["state"] == "running", timeout=60)
        wait_for(lambda: state(other_cp, made[0])["state"] == "running", timeout=60)
        assert exec_ok(other_cp, made[0], "cat /workspace/state")["output"] == "kept\n"
        items, partial = listing(client)
        assert not partial and {item["vm_id"] for item in items} == set(made)


def test_worker_away_past_the_lost_grace_loses_its_sandboxes_and_cleans_up_on_return(fresh):
    with fresh.client() as client:
        vm_id = create(client)
        gone = fresh.worker_of(client, vm_id)
        gone.kill()
        body = wait_for(lambda: (s := state(client, vm_id))["state"] == "destroyed" and s, timeout=90)
        assert body["reason"] == "lost"
        assert listing(client) == ([], False)  # nothing live is left on the down worker
        assert [leak for leak in host_leaks() if vm_id in leak]  # still there: its worker is away
        gone.start()  # what the store no longer knows is destroyed when it registers
        wait_for(lambda: not [leak for leak in host_leaks() if vm_id in leak], timeout=60)
        assert state(client, vm_id)["state"] == "destroyed"


def test_control_plane_killed_mid_create_leaves_no_orphan_and_no_lost_record(fresh):
    victim, survivor = fresh.cps
    with fresh.client(0) as cp1, fresh.client(1) as cp2:
        for worker in fresh.workers:  # hold the create inside the workers while the control plane dies
            worker.freeze(True)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(cp1.post, "/v1/sandboxes", json={"template": "standard"})
                items = wait_for(lambda: listing(cp2)[0], timeout=30, interval=0.02)
                vm_id = items[0]["vm_id"]
                assert items[0]["state"] == "creating"
                victim.kill()
                with pytest.raises(httpx.TransportError):
                    pending.result()
        finally:
            for worker in fresh.workers:
                worker.freeze(False)
        # the surviving control plane settles the abandoned create: nothing runs, the record stays
        body = wait_for(lambda: (s := state(cp2, vm_id))["state"] == "destroyed" and s, timeout=90)
        assert body["reason"] == "create_failed"
        wait_for(lambda: not [leak for leak in host_leaks() if vm_id in leak], timeout=30)
        victim.start()  # back on the same store: the workers register with it again
        fresh_vm = wait_for(lambda: (r := cp1.post("/v1/sandboxes", json={"template": "standard"})).status_code == 201
                            and r.json()["vm_id"], timeout=60)  # fmt: skip
        assert state(cp1, vm_id)["state"] == "destroyed"
        cp1.delete(f"/v1/sandboxes/{fresh_vm}")


def test_no_worker_up_is_503(fresh):
    with fresh.client() as client:
        vm_id = create(client)
        for worker in fresh.workers:
            worker.kill()
        # unreachable workers fail the create at once (503); once marked down they are not tried
        assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 503, "no_workers")
        wait_for(lambda: listing(client) == ([], True), timeout=30)
        assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 503, "no_workers")
        assert state(client, vm_id)["state"] == "unknown"
        assert all(row["state"] == "down" for row in fresh.cps[1].workers().values())


def test_two_control_planes_starting_at_once_migrate_once(cluster):
    """A fresh database, two control planes at once: the advisory lock lets one migrate."""
    subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/createdb", "-h",
                    str(cluster.postgres.dir), "-U", "postgres", "second"], check=True)  # fmt: skip
    url = cluster.postgres.url.replace("/sandboxd?", "/second?")
    cps = [ControlPlane(url, GRACE) for _ in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda cp: cp.start(), cps))
        versions = subprocess.run(
            ["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql", "-h", str(cluster.postgres.dir),
             "-U", "postgres", "-d", "second", "-tAc", "select version_num from alembic_version"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert versions == ["0003"]
        key = cps[0].create_key("carol")
        with cps[1].client(key) as client:
            assert_error(client.post("/v1/sandboxes", json={"template": "standard"}), 503, "no_workers")
    finally:
        for cp in cps:
            cp.stop()
            cp.remove_data()
