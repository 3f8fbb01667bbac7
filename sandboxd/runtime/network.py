"""Per-sandbox networking: a network namespace, a veth pair and nftables rules.

Runtime-agnostic: the OCI backend joins the namespace (``slot.netns_path``); a microVM
backend can put its tap inside it.

Addressing is arithmetic: slot ``index`` owns the /30 at ``subnet + 4*index`` (host side
``.1`` on ``sbx-<index>``, guest ``.2`` on ``eth0`` inside, default route via the host)
and the host port ``host_port_base + index``, DNATed to ``guest_ip:9090``.

Indexes are allocated host-wide (several sandboxd instances may share a host): under an
``flock`` on ``/run/sandboxd/net.lock`` the lowest index whose ``sbx-<index>`` link does
not exist and whose host port nobody has bound is taken, and the link is created before
the lock is released. Each link carries the alias ``sandboxd:<instance>:<vm_id>`` and each
slot a small record under ``/run/sandboxd/net/<instance>/`` (written first), so
``reclaim`` finds whatever a crash left behind, and an instance never touches another's.

Each instance owns one nftables table, ``inet sandboxd_<instance_id>``:

* (a) egress: traffic from the subnet leaving through a non-``sbx-*`` interface is
  masqueraded;
* (b) sandbox → host: everything arriving on ``sbx-*`` for the host itself (input hook,
  IPv4 and IPv6) is dropped unless it belongs to a connection the host opened;
* (c) sandbox → sandbox: forwarding between ``sbx-*`` interfaces is dropped;
* (d) sandbox → private, shared and link-local ranges (10/8, 172.16/12, 192.168/16,
  169.254/16, 100.64/10, fc00::/7, fe80::/10, plus ``extra_egress_deny``) is dropped in
  forward, except destinations in ``egress_allow`` (e.g. a LAN DNS resolver);
* (e) ``host_port`` → ``guest_ip:9090``: DNAT in prerouting (traffic from elsewhere,
  never from a sandbox) and in output (from the host itself, to any local address
  including 127.0.0.1: ``route_localnet`` is set on the host veth and 127.0.0.0/8
  sources are masqueraded out of ``sbx-*``), through a map keyed by port so adding a
  sandbox is one element;
* anti-spoofing: a packet arriving on ``sbx-*`` whose source does not route back through
  that interface is dropped.

IPv6 is disabled on the host side of each veth, so a sandbox has no IPv6 path at all
(the input rule covers it besides).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GUEST_PORT = 9090
NETNS_DIR = Path("/var/run/netns")
RUN_DIR = Path("/run/sandboxd")
HOST_IF_PREFIX = "sbx-"
GUEST_IF = "eth0"
PRIVATE_V4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10"]
PRIVATE_V6 = ["fc00::/7", "fe80::/10"]
CMD_TIMEOUT_S = 30.0

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# nft element deletions run here, off any event loop (its workers are joined at exit)
_BACKGROUND = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sandboxd-net")


class NetworkError(Exception):
    """A network command failed; the message carries the tool's own error text."""


@dataclass(frozen=True)
class NetworkSlot:
    index: int
    netns: str  # the namespace's name under /var/run/netns (= vm_id)
    netns_path: Path
    host_if: str
    host_ip: str
    guest_ip: str
    host_port: int


async def _run(argv: list[str], stdin: bytes | None = None, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), CMD_TIMEOUT_S)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise NetworkError(f"{argv[0]} timed out") from None
    text = out.decode(errors="replace").strip()
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed ({proc.returncode}): {text[-500:]}")
    return proc.returncode, text


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _port_is_free(port: int) -> bool:
    """True when no local socket is bound to TCP ``port`` (v4 or v6)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
        finally:
            s.close()
    return True


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2


def _del_netns(name: str) -> None:
    """What `ip netns del` does: detach the namespace's bind mount and remove the file."""
    path = NETNS_DIR / name
    if _libc.umount2(bytes(path), _MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"umount {path}: {os.strerror(e)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _host_links() -> set[str]:
    try:
        return set(os.listdir("/sys/class/net"))
    except FileNotFoundError:
        return set()


def _link_alias(name: str) -> str:
    try:
        return Path(f"/sys/class/net/{name}/ifalias").read_text().strip()
    except OSError:
        return ""


class NetworkManager:
    def __init__(
        self,
        instance_id: str,
        subnet: str = "10.200.0.0/16",
        host_port_base: int = 30000,
        extra_egress_deny: list[str] | None = None,
        egress_allow: list[str] | None = None,
        *,
        guest_port: int = GUEST_PORT,
        run_dir: Path = RUN_DIR,
    ) -> None:
        if not _INSTANCE_RE.match(instance_id):
            raise ValueError(f"instance_id must match {_INSTANCE_RE.pattern}: {instance_id!r}")
        self.instance_id = instance_id
        self.table = f"sandboxd_{instance_id}"
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.prefixlen > 30:
            raise ValueError(f"subnet {subnet} too small")
        if not 1 <= host_port_base <= 65535:
            raise ValueError(f"host_port_base out of range: {host_port_base}")
        self.max_slots = min(self.subnet.num_addresses // 4, 65536 - host_port_base)
        self.host_port_base = host_port_base
        self.guest_port = guest_port
        self.extra_egress_deny = [str(ipaddress.ip_network(n, strict=False)) for n in (extra_egress_deny or [])]
        self.egress_allow = [str(ipaddress.ip_network(n, strict=False)) for n in (egress_allow or [])]
        self.lock_path = Path(run_dir) / "net.lock"
        self.records = Path(run_dir) / "net" / instance_id
        self.alias_prefix = f"sandboxd:{instance_id}:"
        self._lock = asyncio.Lock()
        self._port_deletions: dict[int, concurrent.futures.Future] = {}
        self._deletions_lock = threading.Lock()

    # ---- addressing ------------------------------------------------------------------

    def slot_for(self, index: int, vm_id: str) -> NetworkSlot:
        if not 0 <= index < self.max_slots:
            raise ValueError(f"slot index {index} out of range")
        base = int(self.subnet.network_address) + 4 * index
        return NetworkSlot(
            index=index,
            netns=vm_id,
            netns_path=NETNS_DIR / vm_id,
            host_if=f"{HOST_IF_PREFIX}{index}",
            host_ip=str(ipaddress.IPv4Address(base + 1)),
            guest_ip=str(ipaddress.IPv4Address(base + 2)),
            host_port=self.host_port_base + index,
        )

    def describe(self, slot: NetworkSlot) -> dict:
        d = asdict(slot)
        d["netns_path"] = str(slot.netns_path)
        d["guest_port"] = self.guest_port
        return d

    # ---- host set-up -----------------------------------------------------------------

    def _ruleset(self, slots: list[NetworkSlot]) -> str:
        t = self.table
        sbx = f'"{HOST_IF_PREFIX}*"'
        elements = ", ".join(f"{s.host_port} : {s.guest_ip} . {self.guest_port}" for s in slots)
        deny4 = [n for n in PRIVATE_V4 + self.extra_egress_deny if ":" not in n]
        deny6 = [n for n in PRIVATE_V6 + self.extra_egress_deny if ":" in n]
        allow4 = [n for n in self.egress_allow if ":" not in n]
        allow6 = [n for n in self.egress_allow if ":" in n]
        lines = [
            f"table inet {t}",
            f"delete table inet {t}",
            f"table inet {t} {{",
            "  map hostports {",
            "    type inet_service : ipv4_addr . inet_service",
            *([f"    elements = {{ {elements} }}"] if elements else []),
            "  }",
            f"  set deny4 {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {', '.join(deny4)} }} }}",
            f"  set deny6 {{ type ipv6_addr; flags interval; auto-merge; elements = {{ {', '.join(deny6)} }} }}",
            "  set allow4 { type ipv4_addr; flags interval; auto-merge; "
            + (f"elements = {{ {', '.join(allow4)} }} " if allow4 else "")
            + "}",
            "  set allow6 { type ipv6_addr; flags interval; auto-merge; "
            + (f"elements = {{ {', '.join(allow6)} }} " if allow6 else "")
            + "}",
            "  chain antispoof {",
            "    type filter hook prerouting priority raw; policy accept;",
            f"    iifname {sbx} fib saddr . iif oif missing drop",
            "  }",
            "  chain prerouting_nat {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    iifname != {sbx} meta nfproto ipv4 fib daddr type local dnat ip to tcp dport map @hostports",
            "  }",
            "  chain output_nat {",
            "    type nat hook output priority -100; policy accept;",
            "    meta nfproto ipv4 fib daddr type local dnat ip to tcp dport map @hostports",
            "  }",
            "  chain postrouting_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname {sbx} ip saddr 127.0.0.0/8 masquerade",
            f"    oifname != {sbx} ip saddr {self.subnet} masquerade",
            "  }",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f"    iifname {sbx} ct state established,related accept",
            f"    iifname {sbx} drop",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    iifname {sbx} ct state established,related accept",
            f"    iifname {sbx} oifname {sbx} drop",
            f"    iifname {sbx} ip daddr @allow4 accept",
            f"    iifname {sbx} ip6 daddr @allow6 accept",
            f"    iifname {sbx} ip daddr @deny4 drop",
            f"    iifname {sbx} ip6 daddr @deny6 drop",
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    async def setup_host(self) -> None:
        """Enable forwarding and (re)build this instance's table, keeping live slots' ports.

        Also routes the whole subnet to "unreachable": traffic for a sandbox address
        with no live slot (e.g. a port mapping racing a release) fails at once instead of
        leaving through the default route. A slot's connected /30 is more specific.
        """
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        self.records.mkdir(parents=True, exist_ok=True)
        links = _host_links()
        live = [s for s in self._read_records().values() if s.host_if in links]
        await asyncio.gather(
            _run(["nft", "-f", "-"], self._ruleset(live).encode()),
            _run(["ip", "route", "replace", "unreachable", str(self.subnet)]),
        )

    async def teardown_host(self) -> None:
        """Delete this instance's table (call when no slot remains). ip_forward stays on."""
        await self._drain_port_deletions()
        rc, out = await _run(["nft", "delete", "table", "inet", self.table], check=False)
        if rc != 0 and "No such file" not in out:
            raise NetworkError(f"nft delete table {self.table} failed: {out[-300:]}")
        with contextlib.suppress(OSError):
            self.records.rmdir()  # only when no slot record is left
        if not any(n.startswith(HOST_IF_PREFIX) for n in _host_links()):
            # no sandbox of any instance left on this host
            await _run(["ip", "route", "del", "unreachable", str(self.subnet)], check=False)

    # ---- records ---------------------------------------------------------------------

    def _record_path(self, vm_id: str) -> Path:
        return self.records / vm_id

    def _read_records(self) -> dict[str, NetworkSlot]:
        slots = {}
        try:
            entries = list(os.scandir(self.records))
        except FileNotFoundError:
            return slots
        for e in entries:
            try:
                d = json.loads(Path(e.path).read_text())
                slots[e.name] = self.slot_for(int(d["index"]), e.name)
            except (OSError, ValueError, KeyError):
                log.warning("unreadable network record %s", e.path)
        return slots

    def get(self, vm_id: str) -> NetworkSlot | None:
        """The slot recorded for vm_id (e.g. to re-adopt a sandbox after a restart)."""
        return self._read_records().get(vm_id)

    # ---- allocate / release ----------------------------------------------------------

    async def allocate(self, vm_id: str) -> NetworkSlot:
        if not _NETNS_RE.match(vm_id):
            raise ValueError(f"invalid vm_id {vm_id!r}")
        t0 = time.perf_counter()
        async with self._lock:
            lock_fd = await asyncio.to_thread(self._lock_host)
            try:
                slot = self._pick_slot(vm_id)
                record = self._record_path(vm_id)
                if record.exists():
                    raise NetworkError(f"{vm_id} already has a network slot")
                if (NETNS_DIR / vm_id).exists():  # not ours: never clean it up
                    raise NetworkError(f"a network namespace named {vm_id} already exists")
                self.records.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"index": slot.index}))
                try:
                    await self._create_host_side(slot)
                except BaseException:
                    await self._release(slot, force=True, wait_link=True)
                    raise
            finally:
                os.close(lock_fd)  # releases the flock
        try:
            await asyncio.gather(
                self._configure_host_side(slot), self._configure_guest_side(slot), self._add_port(slot)
            )
        except BaseException:
            await self._release(slot, force=True, wait_link=True)
            raise
        log.debug("network slot %d for %s in %.1f ms", slot.index, vm_id, (time.perf_counter() - t0) * 1e3)
        return slot

    def _lock_host(self) -> int:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _pick_slot(self, vm_id: str) -> NetworkSlot:
        links = _host_links()
        for index in range(self.max_slots):
            if f"{HOST_IF_PREFIX}{index}" in links:
                continue
            if not _port_is_free(self.host_port_base + index):
                continue
            return self.slot_for(index, vm_id)
        raise NetworkError("no free network slot")

    async def _create_host_side(self, slot: NetworkSlot) -> None:
        batch = (
            f"netns add {slot.netns}\n"
            f"link add {slot.host_if} type veth peer name {GUEST_IF} netns {slot.netns}\n"
            f"link set {slot.host_if} alias {self.alias_prefix}{slot.netns}\n"
        )
        await _run(["ip", "-batch", "-"], batch.encode())
        # the link now exists and claims the index: the rest needs no host-wide lock

    async def _configure_host_side(self, slot: NetworkSlot) -> None:
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{slot.host_if}/disable_ipv6", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{slot.host_if}/route_localnet", "1")
        batch = f"addr add {slot.host_ip}/30 dev {slot.host_if}\nlink set {slot.host_if} up\n"
        await _run(["ip", "-batch", "-"], batch.encode())

    async def _configure_guest_side(self, slot: NetworkSlot) -> None:
        batch = (
            "link set lo up\n"
            f"addr add {slot.guest_ip}/30 dev {GUEST_IF}\n"
            f"link set {GUEST_IF} up\n"
            f"route add default via {slot.host_ip}\n"
        )
        await _run(["ip", "-n", slot.netns, "-batch", "-"], batch.encode())

    async def _add_port(self, slot: NetworkSlot) -> None:
        await self._drain_port_deletions(slot.host_port)
        await _run(
            [
                "nft", "add", "element", "inet", self.table, "hostports",
                f"{{ {slot.host_port} : {slot.guest_ip} . {self.guest_port} }}",
            ]
        )  # fmt: skip

    async def release(self, slot: NetworkSlot) -> None:
        """Remove the slot's namespace, veth and port mapping. Idempotent."""
        t0 = time.perf_counter()
        await self._release(slot)
        log.debug("released network slot %d in %.1f ms", slot.index, (time.perf_counter() - t0) * 1e3)

    async def _release(self, slot: NetworkSlot, force: bool = False, wait_link: bool = False) -> None:
        # Deleting a map element costs an RCU grace period in the kernel (~15 ms): it
        # runs on a background thread; allocating the same port again waits for it.
        self._schedule_port_deletion(slot)
        # Dropping the namespace destroys its eth0 and with it the host's veth in the
        # kernel's netns clean-up work (1-60 ms later, batched); `ip link del` would
        # wait ~25 ms for an RCU grace period instead. Until the link is gone its index
        # is simply not allocated. If something still holds the namespace the link
        # stays: reclaim (wait_link) deletes it.
        _del_netns(slot.netns)
        if wait_link:
            deadline = time.monotonic() + 0.5
            while self._owns_link(slot, force):
                if time.monotonic() > deadline:
                    await _run(["ip", "link", "del", slot.host_if], check=False)
                    break
                await asyncio.sleep(0.002)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(slot.netns).unlink()

    def _owns_link(self, slot: NetworkSlot, force: bool) -> bool:
        """Whether slot.host_if exists and is this slot's (never touch another's link)."""
        alias = _link_alias(slot.host_if)
        if alias == f"{self.alias_prefix}{slot.netns}":
            return True
        return force and alias == "" and os.path.exists(f"/sys/class/net/{slot.host_if}")

    def _schedule_port_deletion(self, slot: NetworkSlot) -> None:
        """Delete the port's map element on a background thread (not tied to any event
        loop, so it completes even if the caller's loop ends); per port in order."""
        port = slot.host_port
        with self._deletions_lock:
            previous = self._port_deletions.get(port)
            fut = _BACKGROUND.submit(self._del_port_sync, port, previous)
            self._port_deletions[port] = fut

        def done(f: concurrent.futures.Future) -> None:
            with self._deletions_lock:
                if self._port_deletions.get(port) is f:
                    del self._port_deletions[port]

        fut.add_done_callback(done)

    async def _drain_port_deletions(self, port: int | None = None) -> None:
        with self._deletions_lock:
            futs = list(self._port_deletions.values()) if port is None else [self._port_deletions.get(port)]
        for f in futs:
            if f is not None:
                await asyncio.wrap_future(f)

    def _del_port_sync(self, port: int, previous: concurrent.futures.Future | None) -> None:
        if previous is not None:
            concurrent.futures.wait([previous])
        argv = ["nft", "delete", "element", "inet", self.table, "hostports", f"{{ {port} }}"]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if p.returncode != 0 and "No such file" not in p.stderr:
            log.warning("nft delete element %d failed: %s", port, p.stderr.strip()[-300:])

    async def reclaim(self, keep: set[str]) -> list[str]:
        """Remove namespaces, veths and port mappings of this instance's sandboxes not in keep."""
        slots = self._read_records()
        for name in _host_links():
            alias = _link_alias(name) if name.startswith(HOST_IF_PREFIX) else ""
            if alias.startswith(self.alias_prefix):
                vm_id = alias[len(self.alias_prefix) :]
                if vm_id not in slots and _NETNS_RE.match(vm_id):
                    with contextlib.suppress(ValueError):
                        slots[vm_id] = self.slot_for(int(name[len(HOST_IF_PREFIX) :]), vm_id)
        reclaimed = []
        for vm_id, slot in sorted(slots.items()):
            if vm_id not in keep:
                await self._release(slot, wait_link=True)
                reclaimed.append(vm_id)
        await self._drain_port_deletions()
        if reclaimed:
            log.info("network reclaimed %d leftover slots", len(reclaimed))
        return reclaimed
