"""Plumbing for many-host tests and the multihost benchmark: a private PostgreSQL cluster,
`sandboxd worker` processes each in its own network namespace (its own "host"), and
control planes (`sandboxd serve --no-local-worker`) reachable from those namespaces.

Addresses: worker N lives in netns `sbdmh<N>` at 198.19.<N>.2, its veth's host side
`sbdmh<N>h` is 198.19.<N>.1 (control planes listen on 0.0.0.0, so a worker reaches them there).
Each worker gets its own sandbox subnet (10.21<N>.0.0/16) and host ports (3<N>000 up), so
its sandboxes never collide with another worker's, nor with the main suite's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import Server, cli

PG_BIN = Path("/usr/lib/postgresql/15/bin")
WORKER_PORT = 8081
# A worker runs in its netns, in a mount namespace of its own with a fresh sysfs (so
# /sys/class/net shows the namespace's links, as `ip netns exec` does) and the host's cgroup
# mounts moved back under it; /run/netns stays shared, so sandbox namespaces it adds are the
# host's to see (and to check for leaks).
_ENTER = (
    'd=$(mktemp -d) && mount --rbind /sys/fs/cgroup "$d" && umount -l /sys && mount -t sysfs sysfs /sys '
    '&& mount --move "$d" /sys/fs/cgroup && rmdir "$d" && exec "$@"'
)


def _run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, **kwargs)


class Postgres:
    """A throwaway PostgreSQL 15 cluster in a temp dir, on a unix socket only."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="sbd-pg-", dir="/tmp"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@/sandboxd?host={self.dir}"

    def _as_postgres(self, *argv: str) -> None:
        _run("runuser", "-u", "postgres", "--", *argv)

    def start(self) -> "Postgres":
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "--no-sync", "-E", "UTF8")  # fmt: skip
        options = f"-c listen_addresses='' -c unix_socket_directories={self.dir} -c fsync=off -c max_connections=200"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                          str(self.dir / "log"), "-w", "start")  # fmt: skip
        self._as_postgres(str(PG_BIN / "createdb"), "-h", str(self.dir), "-U", "postgres", "sandboxd")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _run("runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                 "-w", "stop", check=False)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)


class ControlPlane(Server):
    """`sandboxd serve --no-local-worker` on 0.0.0.0, over a given database."""

    def __init__(self, database_url: str | None, env: dict[str, str], data_dir: Path | None = None):
        extra = ["--no-local-worker", "--reaper-interval", "0.3"]
        if database_url:
            extra += ["--database", database_url]
        super().__init__(*extra, data_dir=data_dir, listen_host="0.0.0.0", env=env)
        self.database_url = database_url

    def _cli(self, *args: str) -> subprocess.CompletedProcess:
        return cli(*args, *(["--database", self.database_url] if self.database_url else []), data_dir=self.data_dir)

    def create_key(self, user: str) -> str:
        return self._cli("keys", "create", "--user", user).stdout.strip()

    def create_worker_token(self, name: str = "worker") -> str:
        return self._cli("workers", "token", "create", "--name", name).stdout.strip()

    def workers(self) -> dict[str, dict]:
        lines = self._cli("workers", "list", "--json").stdout.splitlines()
        return {row["worker_id"]: row for row in map(json.loads, lines)}


class WorkerHost:
    """One `sandboxd worker` in its own network namespace, as if on its own host."""

    def __init__(self, index: int, control_planes: list[ControlPlane], token: str, *, memory_mib: int = 1024,
                 vcpus: int = 2, env: dict[str, str] | None = None):  # fmt: skip
        self.index = index
        self.netns = f"sbdmh{index}"
        self.host_if = f"sbdmh{index}h"
        self.address = f"198.19.{index}.2"
        self.gateway = f"198.19.{index}.1"
        self.url = f"http://{self.address}:{WORKER_PORT}"
        self.control_planes = control_planes
        self.token = token
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.env = {**os.environ, **(env or {}), "SANDBOXD_WORKER_TOKEN": token}
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"sbd-mh{index}-", dir="/tmp"))
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self.process: subprocess.Popen | None = None
        self.worker_id: str | None = None

    def create_netns(self) -> "WorkerHost":
        peer = f"sbdmh{self.index}n"
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", peer, "netns", self.netns)
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", peer)
        _run("ip", "-n", self.netns, "link", "set", peer, "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        _run("ip", "-n", self.netns, "route", "add", "default", "via", self.gateway)
        return self

    def start(self, timeout: float = 120.0) -> "WorkerHost":
        argv = [sys.executable, "-m", "sandboxd", "worker", "--listen", f"{self.address}:{WORKER_PORT}",
                "--advertise", self.address, "--data-dir", str(self.data_dir), "--subnet", f"10.21{self.index}.0.0/16",
                "--host-port-base", f"3{self.index}000", "--vcpus", str(self.vcpus),
                "--memory-mib", str(self.memory_mib)]  # fmt: skip
        for cp in self.control_planes:
            argv += ["--control-plane", f"http://{self.gateway}:{cp.port}"]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "unchanged",
             "sh", "-c", _ENTER, "sh", *argv],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.index} exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.index} did not register:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=1).json()
            except (httpx.TransportError, ValueError):
                health = {}
            if health.get("registered_with") == len(self.control_planes):  # every control plane knows it
                self.worker_id = health["worker_id"]
                return self
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def freeze(self, frozen: bool) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def set_link(self, up: bool) -> None:
        _run("ip", "link", "set", self.host_if, "up" if up else "down")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove(self) -> None:
        self.stop()
        _run("ip", "netns", "del", self.netns, check=False)  # takes the veth pair with it
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def listing(client: httpx.Client) -> tuple[list[dict], bool]:
    """A list answer as (sandboxes, partial)."""
    body = client.get("/v1/sandboxes").json()
    if isinstance(body, dict):
        return body["sandboxes"], body["partial"]
    return body, False
