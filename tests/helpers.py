"""Test plumbing: real `sandboxd serve` processes and a host leak check."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The runtime the suite's servers default to: scripts/test.sh runs the API suite once per
# runtime (oci, gvisor, microvm) so every backend answers the same tests.
TEST_RUNTIME = os.environ.get("SANDBOXD_TEST_RUNTIME", "oci")


def standard_rootfs() -> Path:
    """The standard template's rootfs (scripts/test.sh builds it before the suite)."""
    from sandboxd.config import DEFAULT_CACHE_DIR
    from sandboxd.templates.builder import TemplateStore

    if os.environ.get("SANDBOXD_TEST_ROOTFS"):
        return Path(os.environ["SANDBOXD_TEST_ROOTFS"])
    image = TemplateStore(DEFAULT_CACHE_DIR).get("standard")
    if image is None:
        raise RuntimeError("the standard template is not built: run `sandboxd template build standard`")
    return image.rootfs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, data_dir: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if data_dir is not None:
        env["SANDBOXD_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "sandboxd", *args], capture_output=True, text=True, env=env, check=check, timeout=600
    )


class Server:
    """One `sandboxd serve` process with its own data dir, port and log file."""

    def __init__(self, *extra_args: str, data_dir: Path | None = None, listen_host: str = "127.0.0.1",
                 env: dict[str, str] | None = None):
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="sbd-", dir="/tmp"))
        self.listen_host = listen_host  # 0.0.0.0: also reachable from workers in network namespaces
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        if TEST_RUNTIME != "oci" and "--runtime" not in self.extra_args:
            self.extra_args += ["--runtime", TEST_RUNTIME]
        self.process: subprocess.Popen | None = None
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")

    def start(self, timeout: float = 180.0) -> "Server":
        args = [sys.executable, "-m", "sandboxd", "serve", "--listen", f"{self.listen_host}:{self.port}",
                "--data-dir", str(self.data_dir), *self.extra_args]  # fmt: skip
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandboxd serve exited {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sandboxd serve did not answer in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def create_key(self, user: str) -> str:
        return cli("keys", "create", "--user", user, data_dir=self.data_dir).stdout.strip()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def destroy_all(self, keys: list[str]) -> None:
        for key in keys:
            with self.client(key) as client:
                listing = client.get("/v1/sandboxes").json()
                items = listing["sandboxes"] if isinstance(listing, dict) else listing
                for item in items:
                    client.delete(f"/v1/sandboxes/{item['vm_id']}")

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def host_leaks() -> list[str]:
    """Everything a sandbox may leave on the host, found by looking at the host itself."""
    leaks = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    leaks += [f"netns {name}" for name in netns if name.startswith("sbx_")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    leaks += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if ": sbx-" in line]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    leaks += [f"nft {line}" for line in tables.splitlines() if "sandboxd_" in line]
    with open("/proc/mounts") as mounts:
        leaks += [f"mount {line.split()[1]}" for line in mounts if "/sbx_" in line or "/sbd-" in line]
    leaks += [f"cgroup {path}" for path in glob.glob("/sys/fs/cgroup/*/sbx_*")]
    leaks += [f"cgroup {path}" for path in glob.glob("/sys/fs/cgroup/*/*/sbx_*")]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    leaks += [f"process {line.strip()}" for line in ps.splitlines() if "/opt/sandboxd/guest/agent.py" in line]
    leaks += [f"process {line.strip()}" for line in ps.splitlines() if "qemu-system" in line and "sbx_" in line]
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):  # writable-layer images
        try:
            with open(backing) as f:
                path = f.read().strip()
        except OSError:  # detached meanwhile
            continue
        if "/sbx_" in path and "/disk.img" in path:
            leaks.append(f"loop /dev/{backing.split('/')[3]} {path}")
    return leaks


def guest_agent(server: Server, vm_id: str) -> httpx.Client:
    """A client straight to the sandbox's guest agent (the worker's view of it), over its
    unix socket or (gVisor, microVM) TCP, as state.json records."""
    state = json.loads((server.data_dir / "sandboxes" / vm_id / "state.json").read_text())
    target = state["guest_agent"]
    headers = {"Authorization": f"Bearer {state['token']}"}
    if target.startswith("http://"):
        return httpx.Client(base_url=target, headers=headers, timeout=30)
    return httpx.Client(transport=httpx.HTTPTransport(uds=target), base_url="http://agent", headers=headers, timeout=30)


def kill_sandbox(vm_id: str) -> None:
    """SIGKILL everything the sandbox runs on the host (its agent; runsc's Sentry and gofer;
    a VMM): every runtime puts those in the sandbox's memory cgroup."""
    procs = [int(pid) for pid in Path(f"/sys/fs/cgroup/memory/{vm_id}/cgroup.procs").read_text().split()]
    assert procs, f"no process of {vm_id} in its cgroup"
    for pid in procs:
        os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def exec_ok(client: httpx.Client, vm_id: str, command: str, **extra) -> dict:
    response = client.post(f"/v1/sandboxes/{vm_id}/exec", json={"command": command, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response, status: int, code: str | None = None, field: str | None = None) -> None:
    """A 4xx/5xx answer in the API's one error shape, naming the field when one is given."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if field is not None:
        assert body["error"].get("field") == field, body
        if field not in ("id", "authorization"):  # the message names the input it is about
            assert field.split(".")[0] in body["error"]["message"].lower(), body
