"""Isolation and resource limits, proven from inside sandboxes created through the API."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import TEST_RUNTIME, exec_ok, host_leaks, wait_for

DOCKER_DEFAULT_CAPS = 0x00000000A80425FB
GUEST_IP = "python3 -c \"import socket; s=socket.socket(2, 2); s.connect(('198.18.0.1', 9)); print(s.getsockname()[0])\""


def cgroup_dir(controller: str, vm_id: str) -> Path:
    matches = glob.glob(f"/sys/fs/cgroup/{controller}/**/{vm_id}", recursive=True)
    assert matches, f"no {controller} cgroup for {vm_id}"
    return Path(matches[0])


def test_hostname_pid_namespace_and_init(alice, sandbox):
    assert exec_ok(alice, sandbox, "hostname")["output"].strip() == sandbox
    processes = exec_ok(alice, sandbox, "ps -eo pid,args")["output"].splitlines()[1:]
    processes = [p for p in processes if not p.split(None, 1)[1].startswith("[")]  # a VM's own kernel threads
    assert len(processes) < 10, processes  # only the agent, the shell and ps: not the host's
    assert "agent.py" in exec_ok(alice, sandbox, "cat /proc/1/cmdline | tr '\\0' ' '")["output"]


@pytest.mark.only_runtimes("oci")  # gVisor and VMs run the sandbox on a kernel of its own
def test_every_namespace_is_its_own(alice, sandbox):
    kinds = ("pid", "mnt", "uts", "ipc", "net", "cgroup")
    inside = exec_ok(alice, sandbox, " ".join(f"readlink /proc/1/ns/{kind};" for kind in kinds))["output"].split()
    host = [os.readlink(f"/proc/self/ns/{kind}") for kind in kinds]
    assert len(inside) == len(kinds)
    for kind, theirs, ours in zip(kinds, inside, host):
        assert theirs != ours, f"the sandbox shares the host's {kind} namespace"


def test_host_filesystem_is_invisible_and_template_is_untouched(alice, sandbox, server):
    marker = Path(f"/tmp/host-marker-{uuid.uuid4().hex}")
    marker.write_text("host secret")
    try:
        assert exec_ok(alice, sandbox, f"cat {marker}")["exit_code"] != 0
        assert exec_ok(alice, sandbox, f"ls /proc/1/root{marker}")["exit_code"] != 0
        assert exec_ok(alice, sandbox, f"ls {server.data_dir}")["exit_code"] != 0
    finally:
        marker.unlink()
    assert exec_ok(alice, sandbox, "echo changed > /etc/motd && echo x > /usr/bin/newfile")["exit_code"] == 0
    rootfs_dirs = glob.glob("/var/cache/sandboxd/templates/standard/*/rootfs")
    assert rootfs_dirs and all(not Path(d, "usr/bin/newfile").exists() for d in rootfs_dirs)
    other = alice.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    try:
        assert exec_ok(alice, other, "test -e /usr/bin/newfile")["exit_code"] == 1
    finally:
        alice.delete(f"/v1/sandboxes/{other}")


@pytest.mark.only_runtimes("oci", "gvisor")
def test_capabilities_and_seccomp_are_no_looser_than_docker(alice, sandbox):
    status = exec_ok(alice, sandbox, "cat /proc/self/status")["output"]
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["CapEff"], 16) & ~DOCKER_DEFAULT_CAPS == 0
    assert int(fields["CapBnd"], 16) & ~DOCKER_DEFAULT_CAPS == 0
    if TEST_RUNTIME == "oci":  # gVisor shows neither: no system call reaches the host kernel to filter
        assert fields["Seccomp"].strip() == "2"
        assert fields["NoNewPrivs"].strip() == "1"
        assert exec_ok(alice, sandbox, "unshare -U true")["exit_code"] != 0  # the Sentry's own user namespaces are fine
    assert exec_ok(alice, sandbox, "mount -t tmpfs none /mnt")["exit_code"] != 0
    assert exec_ok(alice, sandbox, "echo 1 > /proc/sys/kernel/panic")["exit_code"] != 0
    assert exec_ok(alice, sandbox, "ip link add dummy0 type dummy 2>&1 || echo refused")["output"].strip()


def assert_ended_whole_and_contained(alice, sandbox, response):
    """gVisor: the Sentry holds all of the sandbox's memory and threads, so a limit the host
    enforces ends the whole sandbox: it is reported lost, its resources are reclaimed, and
    nothing outside it is touched (the server still answers, neighbours keep running)."""
    assert response.status_code in (200, 502), response.text
    if response.status_code == 200:  # the limit stopped the process first
        assert response.json()["exit_code"] != 0, response.text
        return
    body = wait_for(lambda: (s := alice.get(f"/v1/sandboxes/{sandbox}").json())["state"] == "destroyed" and s,
                    timeout=30)
    assert body["reason"] == "lost"
    wait_for(lambda: not [leak for leak in host_leaks() if sandbox in leak], timeout=30)


def test_memory_hog_is_oom_killed_inside_its_sandbox_only(alice, sandbox):
    memory = cgroup_dir("memory", sandbox)
    limit, memsw_limit = (int((memory / name).read_text()) for name in ("memory.limit_in_bytes",
                                                                          "memory.memsw.limit_in_bytes"))
    hog = alice.post(f"/v1/sandboxes/{sandbox}/exec",
                     json={"command": "python3 -c 'b = bytearray(900 * 2**20); print(len(b))'", "timeout_seconds": 60})
    if TEST_RUNTIME == "microvm":
        # the guest has memory_mib of RAM and its own kernel refuses the rest; the host caps
        # the VMM at that plus its own overhead, so the VM cannot take more either
        assert hog.status_code == 200 and hog.json()["exit_code"] != 0, hog.text
        assert "943718400" not in hog.json()["stdout"]
        guest_mib = int(exec_ok(alice, sandbox, "grep MemTotal /proc/meminfo")["output"].split()[1]) // 1024
        assert 400 < guest_mib <= 512, guest_mib
        assert 512 * 2**20 < limit <= 1024 * 2**20
        assert exec_ok(alice, sandbox, "echo alive")["output"] == "alive\n"
        return
    assert limit == memsw_limit == 512 * 2**20
    if TEST_RUNTIME == "gvisor":  # (its cgroups may be gone already: the limits were read first)
        assert_ended_whole_and_contained(alice, sandbox, hog)
        return
    assert hog.status_code == 200 and hog.json()["exit_code"] == 137, hog.text
    oom_control = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
    assert int(oom_control["oom_kill"]) >= 1
    assert exec_ok(alice, sandbox, "echo alive")["output"] == "alive\n"


def test_fork_bomb_stops_at_the_pids_limit(alice, sandbox):
    if TEST_RUNTIME == "microvm":  # the guest kernel's own pids cgroup holds the sandbox's processes
        limit = int(exec_ok(alice, sandbox, "cat /sys/fs/cgroup/sandbox/pids.max")["output"])
    else:
        limit = int((cgroup_dir("pids", sandbox) / "pids.max").read_text())
    script = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print(n, e.errno)\n"
    )
    exec_ok(alice, sandbox, f"cat > /tmp/bomb.py <<'EOF'\n{script}EOF")
    bomb = alice.post(f"/v1/sandboxes/{sandbox}/exec",
                      json={"command": "python3 /tmp/bomb.py; pkill -f 'python3 /tmp/bomb.py'; true", "timeout_seconds": 60})
    if TEST_RUNTIME == "gvisor":
        assert_ended_whole_and_contained(alice, sandbox, bomb)
        return
    assert bomb.status_code == 200, bomb.text
    forked, errno = map(int, bomb.json()["output"].split()[:2])
    assert errno == 11  # EAGAIN: the pids cgroup said no
    assert forked < limit
    assert exec_ok(alice, sandbox, "echo alive")["output"] == "alive\n"


def test_busy_loops_get_about_their_cpu_quota(alice, sandbox):
    cpu = cgroup_dir("cpu", sandbox)
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == int(cpu.joinpath("cpu.cfs_period_us").read_text()) // 2
    usage = cgroup_dir("cpuacct", sandbox) / "cpuacct.usage"
    start_usage, start = int(usage.read_text()), time.monotonic()
    # two busy processes: on 2 cores they would take 2 CPUs without the quota
    exec_ok(alice, sandbox, "timeout 3 sh -c 'while :; do :; done' & timeout 3 sh -c 'while :; do :; done'; wait")
    share = (int(usage.read_text()) - start_usage) / 1e9 / (time.monotonic() - start)
    assert 0.2 < share < 0.8, f"got {share:.2f} CPUs for a 0.5 CPU quota"


# --- network --------------------------------------------------------------------------


def guest_ip(client, vm_id: str) -> str:
    """The address the sandbox's traffic leaves with, as seen from inside (a microVM's own
    address is private to its namespace, which translates it to the slot's)."""
    return exec_ok(client, vm_id, GUEST_IP)["output"].strip()


def slot_of(server, vm_id: str) -> dict:
    """The sandbox's network slot as the worker recorded it (host_ip: the host's end of its veth)."""
    return json.loads((server.data_dir / "sandboxes" / vm_id / "state.json").read_text())["slot"]


def can_connect(client, vm_id: str, host: str, port: int) -> bool:
    probe = f"python3 -c \"import socket; socket.create_connection(('{host}', {port}), timeout=2)\""
    return exec_ok(client, vm_id, probe)["exit_code"] == 0


def start_http_server(client, vm_id: str, port: int = 9090) -> None:
    exec_ok(client, vm_id, f"echo served-by-{vm_id} > /workspace/index.html")
    # socketserver rather than `python3 -m http.server`, which does a reverse DNS lookup on bind
    serve = f"import http.server as h, socketserver as s; s.TCPServer(('', {port}), h.SimpleHTTPRequestHandler).serve_forever()"
    exec_ok(client, vm_id, f'cd /workspace && nohup python3 -c "{serve}" >/dev/null 2>&1 &')
    probe = f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)\""
    for _ in range(50):
        if exec_ok(client, vm_id, probe)["exit_code"] == 0:
            return
        time.sleep(0.1)
    raise TimeoutError("http.server did not start")


def test_host_port_reaches_port_9090_inside(alice, sandbox):
    start_http_server(alice, sandbox)
    endpoint = alice.get(f"/v1/sandboxes/{sandbox}").json()["endpoint"]
    assert httpx.get(endpoint + "/index.html", timeout=5).text == f"served-by-{sandbox}\n"


def test_sandboxes_cannot_reach_each_other(alice, bob, sandbox, server):
    other = bob.post("/v1/sandboxes", json={"template": "standard"}).json()["vm_id"]
    try:
        start_http_server(bob, other)
        assert not can_connect(alice, sandbox, slot_of(server, other)["guest_ip"], 9090)
    finally:
        bob.delete(f"/v1/sandboxes/{other}")


def test_sandbox_cannot_reach_host_services(alice, sandbox, server, host_listener):
    port, accepted = host_listener
    gateway = exec_ok(alice, sandbox, "ip route show default 2>/dev/null | cut -d' ' -f3")["output"].strip()
    if not gateway:  # template without iproute2: the gateway is the .1 of the guest's /30
        octets = guest_ip(alice, sandbox).split(".")
        gateway = ".".join(octets[:3] + [str(int(octets[3]) - 1)])
    host_side = slot_of(server, sandbox)["host_ip"]  # the gateway itself, unless a VM's namespace is in between
    for address in {gateway, host_side}:
        assert not can_connect(alice, sandbox, address, port)
        assert not can_connect(alice, sandbox, address, server.port)  # the control plane / worker API
    assert not can_connect(alice, sandbox, "127.0.0.1", port)  # its own loopback, not the host's
    assert accepted == []


@pytest.fixture
def outside_host():
    """A host 'on the internet': its own netns, reachable only through the worker's routing."""
    name, host_if = f"sbdtest_{uuid.uuid4().hex[:6]}", f"sbdt{uuid.uuid4().hex[:6]}"
    commands = [
        f"ip netns add {name}",
        f"ip link add {host_if} type veth peer name eth0 netns {name}",
        f"ip addr add 198.18.0.1/24 dev {host_if}",
        f"ip link set {host_if} up",
        f"ip -n {name} addr add 198.18.0.2/24 dev eth0",
        f"ip -n {name} link set eth0 up",
        f"ip -n {name} link set lo up",
        f"ip -n {name} route add default via 198.18.0.1",
    ]
    for command in commands:
        subprocess.run(command.split(), check=True)
    # socketserver, not http.server.HTTPServer: the latter does a reverse DNS lookup on bind
    server = subprocess.Popen(
        ["ip", "netns", "exec", name, "/usr/bin/python3", "-c",
         "import http.server as h, socketserver as s\n"
         "class H(h.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        body = self.client_address[0].encode()\n"
         "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
         "        self.wfile.write(body)\n"
         "s.TCPServer(('198.18.0.2', 8000), H).serve_forever()\n"],
    )  # fmt: skip
    try:
        yield "198.18.0.2"
    finally:
        server.kill()
        server.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_egress_is_nated_to_the_outside(alice, sandbox, outside_host):
    fetch = f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{outside_host}:8000/', timeout=5).read().decode())\""
    for _ in range(30):  # the outside server may still be starting
        body = exec_ok(alice, sandbox, fetch)
        if body["exit_code"] == 0:
            break
        time.sleep(0.2)
    assert body["exit_code"] == 0, body
    assert body["output"].strip() == "198.18.0.1"  # masqueraded: the outside sees the host, not the sandbox


def test_socket_swapped_inside_cannot_redirect_the_worker(alice, sandbox, host_unix_listener):
    """The agent's socket directory is writable inside; the worker must keep talking to the
    agent, never to a host socket the sandbox points a symlink at."""
    path, listener = host_unix_listener
    swap = f"rm -f /run/sandboxd/agent.sock && ln -s {path} /run/sandboxd/agent.sock && echo swapped"
    assert exec_ok(alice, sandbox, swap)["output"] == "swapped\n"
    assert exec_ok(alice, sandbox, "readlink /run/sandboxd/agent.sock")["output"].strip() == str(path)
    with pytest.raises(TimeoutError):
        listener.accept()
