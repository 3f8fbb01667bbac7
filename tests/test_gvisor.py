"""The `gvisor` runtime (runsc) through the API: boot, exec, files, isolation, destroy.

Skipped only when runsc is not installed (scripts/setup.sh installs it). One server and
two gVisor sandboxes serve every test here, to keep the (slow, ptrace) gVisor share small.
"""

from __future__ import annotations

import glob
import shutil
import subprocess

import httpx
import pytest

from sandboxd.runtime.gvisor import AGENT_PORT
from tests.helpers import Server, assert_error, exec_ok

# Does not depend on the sandbox runtime: runs in the default (oci) pass only.
pytestmark = pytest.mark.runtime_independent

needs_runsc = pytest.mark.skipif(shutil.which("runsc") is None, reason="runsc (gVisor) is not installed")

GUEST_IP = (
    "python3 -c \"import socket; s=socket.socket(2, 2); s.connect(('198.18.0.1', 9)); print(s.getsockname()[0])\""
)


@pytest.fixture(scope="module")
def gv_server():
    srv = Server().start()
    key = srv.create_key("gvisor-user")
    yield srv, key
    srv.destroy_all([key])
    srv.stop()
    srv.remove_data()


@pytest.fixture(scope="module")
def client(gv_server):
    srv, key = gv_server
    with srv.client(key) as c:
        yield c


def _create(client, **extra) -> str:
    response = client.post("/v1/sandboxes", json={"template": "standard", "runtime": "gvisor", **extra})
    assert response.status_code == 201, response.text
    return response.json()["vm_id"]


@pytest.fixture(scope="module")
def gv(client):
    vm_id = _create(client)
    yield vm_id
    client.delete(f"/v1/sandboxes/{vm_id}")


@pytest.fixture(scope="module")
def gv_other(client):
    vm_id = _create(client)
    yield vm_id
    client.delete(f"/v1/sandboxes/{vm_id}")


def can_connect(client, vm_id: str, host: str, port: int) -> bool:
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.5)\n"
        f"sys.exit(0 if s.connect_ex(({host!r},{port}))==0 else 1)\n"
    )
    return exec_ok(client, vm_id, f"python3 -c '{code}'")["exit_code"] == 0


@needs_runsc
def test_unknown_runtime_is_400_naming_what_exists(client):
    response = client.post("/v1/sandboxes", json={"template": "standard", "runtime": "firecracker"})
    assert_error(response, 400, "unknown_runtime", "runtime")
    message = response.json()["error"]["message"]
    assert "gvisor" in message and "oci" in message
    assert_error(
        client.post("/v1/sandboxes", json={"template": "standard", "runtime": 7}),
        400,
        field="runtime",
    )


@needs_runsc
def test_gvisor_sandbox_reports_its_runtime_and_runs_in_gvisor(client, gv):
    detail = client.get(f"/v1/sandboxes/{gv}").json()
    assert detail["runtime"] == "gvisor" and detail["state"] == "running"
    listed = {item["vm_id"]: item for item in client.get("/v1/sandboxes").json()}
    assert listed[gv]["runtime"] == "gvisor"
    assert exec_ok(client, gv, "hostname")["output"] == f"{gv}\n"
    kernel = exec_ok(client, gv, "dmesg | head -1; uname -r")["output"]
    assert "gVisor" in kernel, kernel
    assert exec_ok(client, gv, "echo out; echo err >&2; exit 3")["exit_code"] == 3


@needs_runsc
def test_coreutils_stat_works_through_the_statx_shim(client, gv):
    listing = exec_ok(client, gv, "ls -l /etc/passwd && stat -c '%s %F' /etc/hostname && cp -a /etc /tmp/etc-copy")
    assert listing["exit_code"] == 0 and "Invalid argument" not in listing["output"], listing
    # the shim only drops AT_NO_AUTOMOUNT: the programs see what the file really is
    assert "regular file" in listing["output"]
    assert exec_ok(client, gv, "cat /etc/ld.so.preload")["output"].strip().endswith("statx-compat.so")


@needs_runsc
def test_default_runtime_is_oci(client):
    response = client.post("/v1/sandboxes", json={"template": "standard"})
    assert response.status_code == 201, response.text
    vm_id = response.json()["vm_id"]
    try:
        assert client.get(f"/v1/sandboxes/{vm_id}").json()["runtime"] == "oci"
        assert "gVisor" not in exec_ok(client, vm_id, "dmesg 2>&1 | head -1")["output"]
    finally:
        client.delete(f"/v1/sandboxes/{vm_id}")


@needs_runsc
def test_files_round_trip(client, gv):
    data = bytes(range(256)) * 4096  # 1 MiB
    put = client.put(
        f"/v1/sandboxes/{gv}/files",
        params={"path": "d/blob.bin", "parents": "true"},
        content=data,
    )
    assert put.status_code == 201, put.text
    got = client.get(f"/v1/sandboxes/{gv}/files", params={"path": "d/blob.bin"})
    assert got.status_code == 200 and got.content == data
    assert exec_ok(client, gv, "sha256sum d/blob.bin | cut -c1-8")["output"].strip()


@needs_runsc
def test_memory_limit_is_configured(client, gv):
    memory = glob.glob(f"/sys/fs/cgroup/memory/{gv}")
    assert memory, "no memory cgroup"
    assert int(open(f"{memory[0]}/memory.limit_in_bytes").read()) == 512 * 2**20
    total_kib = int(exec_ok(client, gv, "awk '/MemTotal/ {print $2}' /proc/meminfo")["output"])
    assert total_kib <= 512 * 1024


@needs_runsc
def test_isolation_from_host_and_other_sandboxes(client, gv, gv_other, gv_server, host_listener):
    srv, _ = gv_server
    port, accepted = host_listener
    ip = exec_ok(client, gv, GUEST_IP)["output"].strip()
    other_ip = exec_ok(client, gv_other, GUEST_IP)["output"].strip()
    gateway = ".".join(ip.split(".")[:3] + [str(int(ip.split(".")[3]) - 1)])
    assert not can_connect(client, gv, gateway, port)
    assert not can_connect(client, gv, gateway, srv.port)  # the control plane / worker API
    assert accepted == []
    # the other sandbox: neither its apps nor its guest agent's TCP port
    body = {
        "command": "python3 -m http.server 9090 >/dev/null 2>&1",
        "background": True,
    }
    assert client.post(f"/v1/sandboxes/{gv_other}/exec", json=body).status_code == 202
    exec_ok(
        client,
        gv_other,
        "for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 9090))' 2>/dev/null && break; sleep 0.1; done",
    )
    assert httpx.get(f"http://{other_ip}:9090/", timeout=5).status_code == 200  # it does serve
    assert not can_connect(client, gv, other_ip, 9090)
    assert not can_connect(client, gv, other_ip, AGENT_PORT)
    # the host reaches the agent port (that is the worker's transport) but only with the token
    assert httpx.get(f"http://{other_ip}:{AGENT_PORT}/health", timeout=5).status_code == 401
    # host_port forwards to 9090 only, never to the agent
    endpoint = client.get(f"/v1/sandboxes/{gv}").json()["endpoint"]
    with pytest.raises(httpx.TransportError):
        httpx.get(endpoint + "/health", timeout=3)


@needs_runsc
def test_destroy_leaves_nothing(client):
    vm_id = _create(client)
    assert client.delete(f"/v1/sandboxes/{vm_id}").status_code == 200
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "runsc" in line and vm_id in line]
    assert vm_id not in open("/proc/mounts").read()
    assert vm_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not glob.glob(f"/sys/fs/cgroup/*/{vm_id}")
    assert client.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "destroyed"


@needs_runsc
def test_gvisor_as_default_and_readopted_after_restart():
    srv = Server("--runtime", "gvisor").start()
    try:
        key = srv.create_key("gvisor-restart")
        with srv.client(key) as c:
            response = c.post("/v1/sandboxes", json={"template": "standard"})
            assert response.status_code == 201, response.text
            vm_id = response.json()["vm_id"]
            assert c.get(f"/v1/sandboxes/{vm_id}").json()["runtime"] == "gvisor"
            exec_ok(c, vm_id, "echo kept > /workspace/mark")
        srv.kill()  # kill -9: the sandbox keeps running, the next start re-adopts it
        srv.start()
        with srv.client(key) as c:
            assert c.get(f"/v1/sandboxes/{vm_id}").json()["state"] == "running"
            assert exec_ok(c, vm_id, "cat /workspace/mark")["output"] == "kept\n"
            assert c.delete(f"/v1/sandboxes/{vm_id}").status_code == 200
    finally:
        srv.stop()
        srv.remove_data()


def test_runtime_flag_accepts_oci_gvisor_and_the_oci_binaries():
    from sandboxd.config import Settings

    assert (Settings.from_env(runtime="gvisor").runtime, Settings.from_env(runtime="gvisor").oci_runtime) == (
        "gvisor",
        "crun",
    )
    runc = Settings.from_env(runtime="runc")
    assert (runc.runtime, runc.oci_runtime) == ("oci", "runc")
    assert Settings.from_env(runtime="oci", oci_runtime="runc").oci_runtime == "runc"
    with pytest.raises(ValueError):
        Settings.from_env(runtime="firecracker")
