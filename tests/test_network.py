"""Per-sandbox networking against real netns, veth and nftables, probed from inside crun sandboxes.

All traffic stays on this host: the "outside world" is a network namespace these tests
create (198.18.0.0/24, a benchmarking range that is not private, plus 192.168.77.0/24
to prove private ranges are dropped), routed through the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from sandboxd.guest.protocol import BOOT_CONFIG_NAME, GUEST_RUN_DIR, SOCKET_NAME
from sandboxd.runtime.base import LaunchSpec, Resources
from sandboxd.runtime.network import NETNS_DIR, NetworkManager
from sandboxd.runtime.oci import OciRuntime
from tests.helpers import standard_rootfs

ROOTFS = standard_rootfs()
REPO_GUEST_DIR = Path(__file__).resolve().parent.parent / "sandboxd" / "guest"
OUTSIDE_HOST_IP, OUTSIDE_IP = "198.18.0.1", "198.18.0.2"
PRIVATE_HOST_IP, PRIVATE_IP = "192.168.77.1", "192.168.77.2"

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("crun"), reason="needs root, nft and crun"
    ),
    pytest.mark.runtime_independent,  # drives NetworkManager directly: the default (oci) pass only
]

STAND_IN_AGENT = """\
import socket
s = socket.socket(socket.AF_UNIX)
s.bind("/run/sandboxd/agent.sock")
s.listen()
while True:
    s.accept()[0].close()
"""

# Replies with the address it sees the client coming from, then closes.
ECHO_PEER_SERVER = """\
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall((sys.argv[3] + " " + peer[0] + "\\n").encode())
    c.close()
"""

CLIENT = """\
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("OK", c.recv(200).decode().strip())
except OSError as e:
    print("FAIL", type(e).__name__)
"""


def run(coro):
    return asyncio.run(coro)


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def guest_code_dir(tmp_path_factory) -> Path:
    if (REPO_GUEST_DIR / "agent.py").exists():
        return REPO_GUEST_DIR
    d = tmp_path_factory.mktemp("guest")
    (d / "agent.py").write_text(STAND_IN_AGENT)
    return d


@pytest.fixture(scope="module")
def outside():
    """A namespace standing for the internet (198.18.0.2) and a LAN host (192.168.77.2)."""
    ns, host_if = f"tout_{new_id()}", f"tout{new_id()[:6]}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        subprocess.run(
            ["ip", "-batch", "-"],
            input=(
                f"addr add {OUTSIDE_HOST_IP}/24 dev {host_if}\n"
                f"addr add {PRIVATE_HOST_IP}/24 dev {host_if}\n"
                f"link set {host_if} up\n"
            ),
            text=True,
            check=True,
        )
        subprocess.run(
            ["ip", "-n", ns, "-batch", "-"],
            input=(
                "link set lo up\n"
                f"addr add {OUTSIDE_IP}/24 dev eth0\n"
                f"addr add {PRIVATE_IP}/24 dev eth0\n"
                "link set eth0 up\n"
                f"route add default via {OUTSIDE_HOST_IP}\n"
            ),
            text=True,
            check=True,
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-c", ECHO_PEER_SERVER, "0.0.0.0", "8080", "outside"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        yield {"ns": ns, "host_if": host_if, "port": 8080}
        server.kill()
        server.wait()
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


class HostServer:
    """A TCP server in this (host) process."""

    def __init__(self, addr: str, tag: str) -> None:
        self.sock = socket.socket(socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.tag = tag
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            c.sendall(f"{self.tag} {peer[0]}\n".encode())
            c.close()

    def close(self) -> None:
        self.sock.close()


class Env:
    """A NetworkManager instance plus crun sandboxes in its slots."""

    def __init__(self, tmp: Path, guest_code_dir: Path) -> None:
        self.nm = NetworkManager(f"t{new_id()}")
        self.rt = OciRuntime("crun", tmp / "oci")
        self.tmp = tmp
        self.guest_code_dir = guest_code_dir
        self.sandboxes: dict[str, tuple[LaunchSpec, object]] = {}
        run(self.nm.setup_host())

    def sandbox(self):
        vm_id = f"sbx_{new_id()}"
        slot = run(self.nm.allocate(vm_id))
        agent_dir = self.tmp / vm_id / "agent"
        agent_dir.mkdir(parents=True)
        (agent_dir / BOOT_CONFIG_NAME).write_text(json.dumps({"protocol": 1, "token": new_id(), "vm_id": vm_id}))
        (agent_dir / "server.py").write_text(ECHO_PEER_SERVER)
        (agent_dir / "client.py").write_text(CLIENT)
        spec = LaunchSpec(
            vm_id=vm_id,
            hostname=vm_id,
            rootfs=ROOTFS,
            resources=Resources(vcpu=1, cpu_fraction=1.0, memory_mib=256, pids_limit=128),
            netns_path=slot.netns_path,
            agent_dir=agent_dir,
            guest_code_dir=self.guest_code_dir,
            state_dir=self.tmp / vm_id / "state",
        )
        self.sandboxes[vm_id] = (spec, slot)
        run(self.rt.launch(spec))
        deadline = time.monotonic() + 20
        while not (agent_dir / SOCKET_NAME).exists():
            assert time.monotonic() < deadline, (spec.state_dir / "init.log").read_text()
            time.sleep(0.02)
        return spec, slot

    def exec(self, spec: LaunchSpec, script: str) -> str:
        rc, out, err = run(self.rt.exec_debug(spec.vm_id, ["sh", "-c", script]))
        assert rc == 0, err
        return out.decode()

    def connect(self, spec: LaunchSpec, host: str, port: int, timeout: float = 1.5) -> str:
        return self.exec(spec, f"python3 {GUEST_RUN_DIR}/client.py {host} {port} {timeout}").strip()

    def serve_9090(self, spec: LaunchSpec) -> None:
        self.exec(
            spec, f"python3 {GUEST_RUN_DIR}/server.py 0.0.0.0 9090 {spec.vm_id} > /dev/null 2>&1 < /dev/null &"
        )
        deadline = time.monotonic() + 10
        while "0.0.0.0:9090" not in sh("ip", "netns", "exec", spec.vm_id, "ss", "-ltn"):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def close(self) -> None:
        for spec, slot in self.sandboxes.values():
            run(self.rt.destroy(spec.vm_id, spec.state_dir))
            run(self.nm.release(slot))
        run(self.nm.teardown_host())


@pytest.fixture(scope="module")
def env(tmp_path_factory, guest_code_dir, outside):
    if not (ROOTFS / "usr/bin/python3").exists():
        pytest.skip(f"no template rootfs at {ROOTFS}")
    e = Env(tmp_path_factory.mktemp("net"), guest_code_dir)
    launched = e.sandboxes  # every sandbox ever launched stays listed until close()
    seen: list[str] = []
    yield e
    seen = [p.name for p in e.tmp.iterdir()]
    e.close()
    assert_instance_gone(e.nm)
    # nothing of any sandbox of this module remains: netns, mounts, cgroups, containers
    assert run(e.rt.list_running()) == set() and not list(e.rt.root.iterdir())
    with open("/proc/self/mountinfo") as f:
        assert str(e.tmp) not in f.read()
    for vm_id in seen:
        assert not (NETNS_DIR / vm_id).exists()
        assert not list(Path("/sys/fs/cgroup").glob(f"*/{vm_id}"))
    del launched


def client_from_host(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=3) as c:
            return "OK " + c.recv(200).decode().strip()
    except OSError as e:
        return "FAIL " + type(e).__name__


def links_with_alias(prefix: str) -> list[str]:
    out = []
    for name in os.listdir("/sys/class/net"):
        try:
            if Path(f"/sys/class/net/{name}/ifalias").read_text().startswith(prefix):
                out.append(name)
        except OSError:
            pass
    return out


def assert_instance_gone(nm: NetworkManager) -> None:
    deadline = time.monotonic() + 5  # the kernel removes a released veth in the background
    while links_with_alias(nm.alias_prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not links_with_alias(nm.alias_prefix)
    assert nm.table not in sh("nft", "list", "tables")
    assert not nm.records.exists()


# ---- unit ---------------------------------------------------------------------------


def test_slot_arithmetic():
    nm = NetworkManager("unit", subnet="10.200.0.0/16", host_port_base=30000)
    s0, s5 = nm.slot_for(0, "sbx_a"), nm.slot_for(5, "sbx_b")
    assert (s0.host_ip, s0.guest_ip, s0.host_port, s0.host_if) == ("10.200.0.1", "10.200.0.2", 30000, "sbx-0")
    assert (s5.host_ip, s5.guest_ip, s5.host_port, s5.host_if) == ("10.200.0.21", "10.200.0.22", 30005, "sbx-5")
    assert s5.netns_path == NETNS_DIR / "sbx_b"
    assert nm.max_slots == 16384
    with pytest.raises(ValueError):
        nm.slot_for(16384, "x")
    with pytest.raises(ValueError):
        NetworkManager("bad-name")


# ---- allocate / release ---------------------------------------------------------------


def test_allocate_and_release():
    nm = NetworkManager(f"t{new_id()}")
    run(nm.setup_host())
    try:
        vm_id = f"sbx_{new_id()}"
        slot = run(nm.allocate(vm_id))
        assert slot.netns_path.exists()
        host_if = Path(f"/sys/class/net/{slot.host_if}")
        assert (host_if / "ifalias").read_text().strip() == f"{nm.alias_prefix}{vm_id}"
        assert Path(f"/proc/sys/net/ipv4/conf/{slot.host_if}/route_localnet").read_text().strip() == "1"
        assert Path(f"/proc/sys/net/ipv6/conf/{slot.host_if}/disable_ipv6").read_text().strip() == "1"
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        inside = sh("ip", "-n", vm_id, "-4", "addr", "show", "eth0")
        assert f"{slot.guest_ip}/30" in inside
        assert f"default via {slot.host_ip} dev eth0" in sh("ip", "-n", vm_id, "route")
        assert "UP" in sh("ip", "-n", vm_id, "link", "show", "lo")
        mapping = sh("nft", "list", "map", "inet", nm.table, "hostports")
        assert f"{slot.host_port} : {slot.guest_ip} . 9090" in mapping
        assert nm.get(vm_id) == slot

        run(nm.release(slot))
        run(nm.release(slot))  # idempotent
        assert not slot.netns_path.exists()
        assert nm.get(vm_id) is None
        run(nm._drain_port_deletions())
        assert f"{slot.host_port} :" not in sh("nft", "list", "map", "inet", nm.table, "hostports")
    finally:
        run(nm.teardown_host())
    assert_instance_gone(nm)


def test_two_instances_never_share_an_index():
    a, b = NetworkManager(f"t{new_id()}"), NetworkManager(f"t{new_id()}")
    run(a.setup_host())
    run(b.setup_host())

    async def both():
        return await asyncio.gather(*(m.allocate(f"sbx_{new_id()}") for m in (a, b, a, b, a, b)))

    slots = run(both())
    try:
        assert len({s.index for s in slots}) == 6
        assert len({s.host_port for s in slots}) == 6
        assert len({s.guest_ip for s in slots}) == 6
    finally:
        for s in slots:
            run((a if a.get(s.netns) else b).release(s))
        run(a.teardown_host())
        run(b.teardown_host())
    assert_instance_gone(a)
    assert_instance_gone(b)


def test_allocation_skips_a_host_port_in_use():
    nm = NetworkManager(f"t{new_id()}", host_port_base=41000)
    run(nm.setup_host())
    links = set(os.listdir("/sys/class/net"))
    first_free = next(i for i in range(1000) if f"sbx-{i}" not in links)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 41000 + first_free))
    blocker.listen()
    try:
        slot = run(nm.allocate(f"sbx_{new_id()}"))
        assert slot.index != first_free and slot.host_port != 41000 + first_free
        run(nm.release(slot))
    finally:
        blocker.close()
        run(nm.teardown_host())
    assert_instance_gone(nm)


def test_reclaim_after_restart_keeps_only_known_slots():
    iid = f"t{new_id()}"
    nm = NetworkManager(iid)
    run(nm.setup_host())
    keep, leak = run(nm.allocate(f"sbx_{new_id()}")), run(nm.allocate(f"sbx_{new_id()}"))
    # a restarted worker: a fresh manager for the same instance rebuilds its table ...
    again = NetworkManager(iid)
    run(again.setup_host())
    mapping = sh("nft", "list", "map", "inet", again.table, "hostports")
    assert f"{keep.host_port} : {keep.guest_ip} . 9090" in mapping  # live slots keep their ports
    # ... and reclaims what it no longer knows
    assert run(again.reclaim({keep.netns})) == [leak.netns]
    assert not leak.netns_path.exists() and keep.netns_path.exists()
    assert not Path(f"/sys/class/net/{leak.host_if}").exists()
    assert f"{leak.host_port} :" not in sh("nft", "list", "map", "inet", again.table, "hostports")
    # another instance's reclaim never touches this one's slots
    other = NetworkManager(f"t{new_id()}")
    assert run(other.reclaim(set())) == []
    assert keep.netns_path.exists()
    assert run(again.reclaim(set())) == [keep.netns]
    run(again.teardown_host())
    assert_instance_gone(again)


# ---- from inside sandboxes --------------------------------------------------------------


def test_egress_to_the_outside_is_masqueraded(env, outside):
    spec, slot = env.sandbox() if not env.sandboxes else next(iter(env.sandboxes.values()))
    assert env.connect(spec, OUTSIDE_IP, outside["port"]) == f"OK outside {OUTSIDE_HOST_IP}"


def test_private_ranges_are_dropped(env, outside):
    spec, _ = next(iter(env.sandboxes.values())) if env.sandboxes else env.sandbox()
    # the same server, reached through a private address: dropped
    assert env.connect(spec, PRIVATE_IP, outside["port"]).startswith("FAIL")


def test_sandbox_cannot_reach_the_host(env):
    spec, slot = next(iter(env.sandboxes.values())) if env.sandboxes else env.sandbox()
    anywhere = HostServer("0.0.0.0", "host")
    on_veth = HostServer(slot.host_ip, "veth")
    try:
        # sanity: the host itself reaches them
        assert client_from_host("127.0.0.1", anywhere.port).startswith("OK host")
        for addr in (slot.host_ip, "192.0.2.2", OUTSIDE_HOST_IP, "127.0.0.1"):
            assert env.connect(spec, addr, anywhere.port).startswith("FAIL"), addr
        assert env.connect(spec, slot.host_ip, on_veth.port).startswith("FAIL")
        assert anywhere.hits == 1 and on_veth.hits == 0
        # no IPv6 path either (the host's global v6 address)
        out = env.exec(spec, f"python3 {GUEST_RUN_DIR}/client.py fd00::2 {anywhere.port} 1")
        assert out.startswith("FAIL")
    finally:
        anywhere.close()
        on_veth.close()


def test_port_forward_and_sandbox_to_sandbox(env, outside):
    a, _ = next(iter(env.sandboxes.values())) if env.sandboxes else env.sandbox()
    b, slot_b = env.sandbox()
    env.serve_9090(b)
    # the host reaches b's port 9090 through its host port, on loopback and on its other address
    assert client_from_host("127.0.0.1", slot_b.host_port) == f"OK {b.vm_id} {slot_b.host_ip}"
    assert client_from_host("192.0.2.2", slot_b.host_port).startswith(f"OK {b.vm_id}")
    # and so does a client elsewhere (prerouting), keeping its own address
    out = sh(
        "ip", "netns", "exec", outside["ns"], "python3", "-c", CLIENT, OUTSIDE_HOST_IP, str(slot_b.host_port), "3"
    )
    assert out.strip() == f"OK {b.vm_id} {OUTSIDE_IP}"
    # sandbox a reaches b neither directly nor through the host port
    assert env.connect(a, slot_b.guest_ip, 9090).startswith("FAIL")
    a_slot = env.sandboxes[a.vm_id][1]
    for addr in (a_slot.host_ip, "192.0.2.2", OUTSIDE_HOST_IP):
        assert env.connect(a, addr, slot_b.host_port).startswith("FAIL"), addr
    # after b's release its port answers no more (and nothing leaves the host for it)
    run(env.rt.destroy(b.vm_id, b.state_dir))
    run(env.nm.release(slot_b))
    del env.sandboxes[b.vm_id]
    assert client_from_host("127.0.0.1", slot_b.host_port).startswith("FAIL")
