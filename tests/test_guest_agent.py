"""The guest agent as a real process on the host, driven through GuestClient.

The agent is run with Debian's /usr/bin/python3 when present (the interpreter templates
ship; the agent is standard-library only), else with the test interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import sandboxd.guest as guest_pkg
from sandboxd.guest.client import GuestClient, GuestError, GuestUnavailable
from sandboxd.guest.protocol import PROTOCOL_VERSION
from tests.helpers import standard_rootfs

# Runs the agent on the host, whatever the runtime: the default (oci) pass only.
pytestmark = [pytest.mark.timeout(120), pytest.mark.runtime_independent]

AGENT = Path(guest_pkg.__file__).resolve().parent / "agent.py"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TOKEN = "tok-" + secrets.token_hex(8)


def run(coro):
    return asyncio.run(coro)


def unique_sleep() -> str:
    """A `sleep` argument no other process on the machine uses, to find ours in /proc."""
    return "1000.%d" % secrets.randbelow(10**9)


def pids_with_cmdline(needle: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            out.append(int(d))
    return out


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every child of pid (the agent is a subreaper, so orphans land here)."""
    kids = []
    for tdir in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (tdir / "children").read_text().split()]
        except OSError:
            pass
    out = []
    for k in kids:
        try:
            stat = Path(f"/proc/{k}/stat").read_text()
        except OSError:
            continue
        out.append((k, stat.rsplit(")", 1)[1].split()[0]))
    return out


class Agent:
    def __init__(self, tmp_path: Path, *, token: str = TOKEN, env: dict | None = None, listen: str | None = None):
        self.run_dir = tmp_path / "run"
        self.workspace = tmp_path / "ws"
        self.run_dir.mkdir()
        self.token = token
        self.boot = self.run_dir / "boot.json"
        self.boot.write_text(json.dumps({
            "protocol": PROTOCOL_VERSION, "vm_id": "sbx_test0001", "token": token,
            "env": env if env is not None else {"BOOT_VAR": "from-boot", "SHARED": "boot"},
            "hostname": "sbx-host",
        }))
        self.socket = self.run_dir / "agent.sock"
        self.stderr_path = tmp_path / "agent.stderr"
        argv = [PY, "-s", "-B", str(AGENT), "--run-dir", str(self.run_dir), "--workspace", str(self.workspace)]
        if listen:
            argv += ["--listen", listen]
        self.t0 = time.monotonic()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd="/")
        self.target = str(self.socket)
        if listen:
            self.target = "http://" + self._wait_stderr_addr()
        self.ready_health = self.call(lambda c: c.wait_ready(10))
        self.ready_seconds = time.monotonic() - self.t0

    def _wait_stderr_addr(self) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = self.stderr_path.read_text()
            if "ready on " in text:
                return text.split("ready on ", 1)[1].split()[0]
            time.sleep(0.01)
        raise AssertionError("agent did not report its address: " + self.stderr_path.read_text())

    def client(self, token: str | None = None) -> GuestClient:
        return GuestClient(self.target, self.token if token is None else token)

    def call(self, fn, token: str | None = None):
        async def go():
            async with self.client(token) as c:
                return await fn(c)

        return run(go())

    def exec(self, command: str, **kw) -> dict:
        return self.call(lambda c: c.exec(command, **kw))

    def raw(self, data: bytes, *, read_until_close: bool = True, timeout: float = 5) -> bytes:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(self.socket))
        s.sendall(data)
        buf = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if not read_until_close and b"\r\n\r\n" in buf:
                    head, _, body = buf.partition(b"\r\n\r\n")
                    cl = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                    if cl and len(body) >= int(cl[0].split(b":")[1]):
                        break
        except socket.timeout:
            pass
        finally:
            s.close()
        return buf

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path)
    yield a
    a.stop()


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


# --- boot, health, auth ------------------------------------------------------------------

def test_boot_health_and_socket(agent):
    h = agent.ready_health
    assert h["protocol"] == PROTOCOL_VERSION
    assert h["vm_id"] == "sbx_test0001"
    assert h["pid"] == agent.proc.pid
    assert isinstance(h["agent_version"], str) and h["agent_version"]
    assert h["uptime_seconds"] >= 0
    assert not agent.boot.exists(), "boot.json carries the token: the agent must delete it"
    assert (agent.socket.stat().st_mode & 0o777) == 0o600
    assert agent.workspace.is_dir()
    assert [p.name for p in agent.run_dir.iterdir()] == ["agent.sock"]


def test_auth_required(agent):
    with pytest.raises(GuestError) as ei:
        agent.call(lambda c: c.health(), token="wrong-token")
    assert ei.value.status == 401 and ei.value.code == "unauthorized"

    async def no_token():
        t = httpx.AsyncHTTPTransport(uds=str(agent.socket))
        async with httpx.AsyncClient(transport=t, base_url="http://a") as c:
            r1 = await c.get("/health")
            r2 = await c.post("/exec", json={"command": "touch /tmp/should-not-exist"})
            r3 = await c.get("/health", headers={"Authorization": "Basic " + TOKEN})
            r4 = await c.get("/health", headers={"Authorization": "Bearer " + TOKEN[:-1]})
            return r1, r2, r3, r4

    for r in run(no_token()):
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"


def test_wait_ready_times_out_without_agent(tmp_path):
    async def go():
        async with GuestClient(str(tmp_path / "nope.sock"), "t") as c:
            t0 = time.monotonic()
            with pytest.raises(GuestUnavailable):
                await c.wait_ready(0.3)
            assert time.monotonic() - t0 < 2

    run(go())


def test_missing_boot_config_fails(tmp_path):
    (tmp_path / "run").mkdir()
    p = subprocess.run([PY, "-s", "-B", str(AGENT), "--run-dir", str(tmp_path / "run"),
                        "--workspace", str(tmp_path / "ws")], capture_output=True, timeout=10)
    assert p.returncode != 0
    assert b"boot.json" in p.stderr


# --- exec ----------------------------------------------------------------------------------

def test_exec_basic(agent):
    r = agent.exec("echo hello && ls /")
    assert r["exit_code"] == 0 and r["timed_out"] is False and r["truncated"] is False
    assert r["output"].startswith("hello\n") and r["stdout"] == r["output"] and r["stderr"] == ""
    assert r["duration_ms"] >= 0

    r = agent.exec("echo out; echo err >&2; exit 7")
    assert r["exit_code"] == 7
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n"
    assert sorted(r["output"].splitlines()) == ["err", "out"]

    r = agent.exec("kill -TERM $$")
    assert r["exit_code"] == 128 + signal.SIGTERM

    r = agent.exec("cat; echo rc=$?")  # stdin is /dev/null: must not hang
    assert r["stdout"] == "rc=0\n"

    r = agent.exec("printf '\\377\\376 ok'")
    assert r["stdout"].endswith(" ok") and "\ufffd" in r["stdout"]


def test_exec_interleaving_order(agent):
    r = agent.exec("echo a; sleep 0.1; echo b >&2; sleep 0.1; echo c; sleep 0.1; echo d >&2")
    assert r["output"] == "a\nb\nc\nd\n"
    assert r["stdout"] == "a\nc\n" and r["stderr"] == "b\nd\n"


def test_exec_cwd_and_env(agent):
    r = agent.exec("pwd")
    assert r["stdout"] == f"{agent.workspace}\n"
    (agent.workspace / "sub").mkdir()
    assert agent.exec("pwd", cwd="sub")["stdout"] == f"{agent.workspace}/sub\n"
    assert agent.exec("pwd", cwd="/tmp")["stdout"] == "/tmp\n"

    r = agent.exec('echo "$BOOT_VAR|$SHARED|$REQ|$HOME|$HOSTNAME|$LANG|$TERM|$PATH"',
                   env={"REQ": "r 1", "SHARED": "request"})
    assert r["stdout"] == ("from-boot|request|r 1|/root|sbx-host|C.UTF-8|xterm|"
                           "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
    # The agent's own environment does not leak into commands.
    assert "PYTEST" not in agent.exec("env")["stdout"]


def test_exec_missing_cwd(agent):
    with pytest.raises(GuestError) as ei:
        agent.exec("pwd", cwd="/does/not/exist")
    assert ei.value.status == 400 and ei.value.code == "cwd_not_found"
    assert "/does/not/exist" in ei.value.message


def test_exec_timeout_kills_the_whole_group(agent):
    marker = unique_sleep()
    r = agent.exec(f"sleep {marker} & sleep {marker}; echo never", timeout_seconds=0.5)
    assert r["timed_out"] is True
    assert r["exit_code"] == 128 + signal.SIGKILL
    assert "never" not in r["output"]
    assert 400 <= r["duration_ms"] < 5000
    deadline = time.monotonic() + 3
    while pids_with_cmdline(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pids_with_cmdline(f"sleep {marker}") == []
    deadline = time.monotonic() + 3
    while children_of(agent.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children_of(agent.proc.pid) == [], "killed processes must be reaped, not left as zombies"
    assert agent.call(lambda c: c.status())["running_commands"] == 0


def test_exec_output_cap(agent):
    r = agent.exec("head -c 3000000 /dev/zero | tr '\\0' a; echo done >&2", max_output_bytes=1000)
    assert r["exit_code"] == 0 and r["timed_out"] is False
    assert r["truncated"] is True
    assert r["stdout"] == "a" * 1000
    assert r["stderr"] == "done\n"
    assert len(r["output"]) == 1000
    r = agent.exec("echo 12345", max_output_bytes=6)
    assert r["truncated"] is False and r["stdout"] == "12345\n"


def test_background_grandchild_does_not_hang_exec(agent):
    marker = unique_sleep()
    try:
        t0 = time.monotonic()
        r = agent.exec(f"sleep {marker} & echo hi", timeout_seconds=30)
        assert time.monotonic() - t0 < 5
        assert r["output"] == "hi\n" and r["exit_code"] == 0 and r["timed_out"] is False
        assert len(pids_with_cmdline(f"sleep {marker}")) == 1  # it keeps running in the background
    finally:
        for pid in pids_with_cmdline(f"sleep {marker}"):
            os.kill(pid, signal.SIGKILL)


def test_orphans_are_reaped(agent):
    agent.exec("sh -c 'sleep 0.2 &'; (sleep 0.1 &)")
    deadline = time.monotonic() + 5
    while children_of(agent.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_of(agent.proc.pid) == []


def test_concurrent_execs_and_status(agent):
    async def go(c: GuestClient):
        long = asyncio.create_task(c.exec("sleep 1; echo slow"))
        seen = 0
        for _ in range(200):
            seen = (await c.status())["running_commands"]
            if seen == 1:
                break
            await asyncio.sleep(0.01)
        quick = await asyncio.gather(*(c.exec(f"echo {i}") for i in range(5)))
        assert [q["stdout"] for q in quick] == [f"{i}\n" for i in range(5)]
        mid = await c.status()
        res = await long
        after = await c.status()
        return seen, mid, res, after

    before = agent.call(lambda c: c.status())
    assert before == {"running_commands": 0, "running_services": 0, "last_command_finished_at": None,
                      "file_transfers": 0, "file_watches": 0}
    seen, mid, res, after = agent.call(go)
    assert seen == 1 and mid["running_commands"] == 1
    assert res["stdout"] == "slow\n"
    assert after["running_commands"] == 0
    assert after["last_command_finished_at"].endswith("Z")


def test_exec_bad_input(agent):
    bad = [
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": 5}, "command"),
        ({"command": "true", "timeout_seconds": 0}, "timeout_seconds"),
        ({"command": "true", "timeout_seconds": "10"}, "timeout_seconds"),
        ({"command": "true", "timeout_seconds": True}, "timeout_seconds"),
        ({"command": "true", "env": {"A": 1}}, "env"),
        ({"command": "true", "env": ["A=1"]}, "env"),
        ({"command": "true", "cwd": 3}, "cwd"),
        ({"command": "true", "max_output_bytes": -1}, "max_output_bytes"),
        ({"command": "true", "max_output_bytes": 1.5}, "max_output_bytes"),
        ({"command": "a\u0000b"}, "command"),
    ]

    async def go():
        t = httpx.AsyncHTTPTransport(uds=str(agent.socket))
        async with httpx.AsyncClient(transport=t, base_url="http://a", headers=auth()) as c:
            out = []
            for body, field in bad:
                r = await c.post("/exec", json=body)
                out.append((r, field))
            out.append((await c.post("/exec", content=b"{not json"), "json"))
            out.append((await c.post("/exec", content=b"[1, 2]"), "json"))
            out.append((await c.post("/exec", content=b"\xff\xfe"), "json"))
            out.append((await c.post("/exec", content=b"[" * 100000), "json"))
            # Unknown fields are ignored.
            ok = await c.post("/exec", json={"command": "echo ok", "future_field": {"x": 1}})
            nf = await c.get("/nope")
            na = await c.get("/exec")
            big = await c.post("/exec", content=b"x" * (9 * 1024 * 1024))
            after = await c.get("/health")
            return out, ok, nf, na, big, after

    out, ok, nf, na, big, after = run(go())
    for r, field in out:
        assert r.status_code == 400, (field, r.text)
        err = r.json()["error"]
        assert err["code"] and err["code"] == err["code"].lower()
        if field != "json":
            assert field in err["message"], (field, err)
        else:
            assert err["code"] == "invalid_json"
    assert ok.status_code == 200 and ok.json()["stdout"] == "ok\n"
    assert nf.status_code == 404 and nf.json()["error"]["code"] == "not_found"
    assert na.status_code == 405 and na.json()["error"]["code"] == "method_not_allowed"
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert after.status_code == 200


# --- logs ----------------------------------------------------------------------------------

def test_logs(agent):
    first = agent.call(lambda c: c.logs())
    assert first["truncated"] is False
    assert first["entries"][0]["stream"] == "system" and first["entries"][0]["source"] == "agent"
    start_ts = first["entries"][-1]["ts"]
    assert start_ts.endswith("Z") and len(start_ts) == len("2025-01-01T00:00:00.000000Z")

    agent.exec("for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2; printf 'partial'")
    r = agent.call(lambda c: c.logs(since=start_ts))
    texts = [(e["stream"], e["source"], e["text"]) for e in r["entries"]]
    assert ("stderr", "exec", "oops") in texts
    assert [t for s, _, t in texts if s == "stdout"] == ["line1", "line2", "line3", "line4", "line5", "partial"]
    assert r["truncated"] is False
    ts = [e["ts"] for e in r["entries"]]
    assert ts == sorted(ts) and len(set(ts)) == len(ts) and ts[0] > start_ts

    lim = agent.call(lambda c: c.logs(since=start_ts, limit=2))
    assert lim["truncated"] is True
    assert [e["text"] for e in lim["entries"]] == [e["text"] for e in r["entries"][-2:]]

    # since = the last timestamp seen returns nothing new; unix seconds are accepted too.
    assert agent.call(lambda c: c.logs(since=ts[-1]))["entries"] == []
    assert agent.call(lambda c: c.logs(since=time.time() + 3600))["entries"] == []
    assert len(agent.call(lambda c: c.logs(since=0, limit=10000))["entries"]) >= 7
    assert agent.call(lambda c: c.logs(since="2000-01-01T00:00:00+00:00"))["entries"]

    # long lines are split at 16 KiB; CRLF is one line end
    agent.exec("head -c 20000 /dev/zero | tr '\\0' x; echo; printf 'a\\r\\nb\\n'")
    tail = agent.call(lambda c: c.logs(limit=4))["entries"]
    assert [len(e["text"]) for e in tail] == [16384, 20000 - 16384, 1, 1]

    for bad in ({"limit": 0}, {"limit": 10001}, {"limit": "x"}, {"since": "yesterday"}):
        with pytest.raises(GuestError) as ei:
            agent.call(lambda c, b=bad: c.logs(**b))
        assert ei.value.status == 400
        assert list(bad)[0] in ei.value.message


def test_log_ring_is_bounded(agent):
    agent.exec("seq 1 30000")
    r = agent.call(lambda c: c.logs(since=0, limit=10000))
    assert r["truncated"] is False  # the older lines were evicted from the ring
    assert len(r["entries"]) == 10000
    assert r["entries"][-1]["text"] == "30000"
    agent.exec("i=0; while [ $i -lt 300 ]; do head -c 16000 /dev/zero | tr '\\0' y; echo; i=$((i+1)); done")
    r = agent.call(lambda c: c.logs(since=0, limit=10000))
    assert sum(len(e["text"]) for e in r["entries"]) <= 2 * 1024 * 1024


# --- HTTP layer ------------------------------------------------------------------------------

def test_keepalive_pipelining_chunked_and_expect(agent):
    a = auth()["Authorization"].encode()
    two = (b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: " + a + b"\r\n\r\n"
           b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: " + a + b"\r\nConnection: close\r\n\r\n")
    out = agent.raw(two)
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"running_commands" in out

    body = json.dumps({"command": "echo chunked"}).encode()
    head = (b"POST /exec HTTP/1.1\r\nHost: x\r\nAuthorization: " + a + b"\r\nTransfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    chunks = b"%x\r\n" % 5 + body[:5] + b"\r\n" + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(agent.socket))
        s.sendall(head)
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(chunks)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert b'"stdout":"chunked\\n"' in out

    for garbage in (b"NOT HTTP\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /health HTTP/1.1\r\nbad header\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n"):
        out = agent.raw(garbage)
        assert out.split(b" ")[1][:1] in (b"4", b"5"), out[:100]
    assert agent.call(lambda c: c.health())["protocol"] == PROTOCOL_VERSION

    # HTTP/1.0 without keep-alive gets an answer and a close.
    out = agent.raw(b"GET /health HTTP/1.0\r\nAuthorization: " + a + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out


def test_client_reuses_one_connection(agent):
    async def go(c: GuestClient):
        for _ in range(20):
            await c.exec("true")
        return c._http._transport._pool.connections  # noqa: SLF001 - check pooling

    conns = agent.call(go)
    assert len(conns) == 1


def test_tcp_listen(tmp_path):
    a = Agent(tmp_path, listen="127.0.0.1:0")
    try:
        assert a.target.startswith("http://127.0.0.1:")
        assert a.exec("echo tcp")["stdout"] == "tcp\n"
        assert not a.socket.exists()
    finally:
        a.stop()


def test_client_errors_become_unavailable(agent):
    async def go(c: GuestClient):
        await c.health()
        agent.stop()
        with pytest.raises(GuestUnavailable):
            await c.exec("true")

    agent.call(go)


# --- shutdown ------------------------------------------------------------------------------

def test_sigterm_exits_cleanly_and_kills_commands(agent):
    marker = unique_sleep()

    async def go(c: GuestClient):
        task = asyncio.create_task(c.exec(f"sleep {marker}"))
        for _ in range(200):
            if (await c.status())["running_commands"] == 1:
                break
            await asyncio.sleep(0.01)
        agent.proc.send_signal(signal.SIGTERM)
        try:
            await task
        except GuestUnavailable:
            pass

    agent.call(go)
    assert agent.proc.wait(10) == 0
    assert not agent.socket.exists()
    assert not agent.boot.exists()
    deadline = time.monotonic() + 3
    while pids_with_cmdline(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pids_with_cmdline(f"sleep {marker}") == []


# --- inside the Debian template rootfs, as PID 1 -------------------------------------------

ROOTFS = standard_rootfs()


@pytest.mark.skipif(os.geteuid() != 0 or not (ROOTFS / "usr/bin/python3").exists()
                    or not shutil.which("unshare"), reason="needs root and a Debian test rootfs")
def test_agent_as_pid1_in_debian_rootfs(tmp_path):
    """The real thing: Debian's python3 in the template, PID 1 of a PID namespace."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for d in ("upper", "work", "root"):
        (tmp_path / d).mkdir()
    (run_dir / "boot.json").write_text(json.dumps({"protocol": 1, "vm_id": "sbx_pid1", "token": TOKEN, "env": {}}))
    script = f"""
set -e
mount -t overlay overlay -o lowerdir={ROOTFS},upperdir={tmp_path}/upper,workdir={tmp_path}/work {tmp_path}/root
mkdir -p {tmp_path}/root/opt/sandboxd/guest {tmp_path}/root/run/sandboxd
mount --bind -o ro {AGENT.parent} {tmp_path}/root/opt/sandboxd/guest
mount --bind {run_dir} {tmp_path}/root/run/sandboxd
mount -t proc proc {tmp_path}/root/proc
exec chroot {tmp_path}/root /usr/bin/python3 -s -B /opt/sandboxd/guest/agent.py
"""
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", script],
                                stdout=err, stderr=err)
    try:
        async def go():
            async with GuestClient(str(run_dir / "agent.sock"), TOKEN) as c:
                h = await c.wait_ready(15)
                r = await c.exec("python3 -c 'import sys; print(sys.version_info[:2])'; ps -o pid= -p 1; pwd")
                await c.exec("sh -c 'sleep 0.1 &'; (sleep 0.1 &)")
                await asyncio.sleep(0.5)
                z = await c.exec("ps -eo stat= | grep -c '^Z' || true")
                t = await c.exec("sleep 100 & sleep 100", timeout_seconds=0.3)
                await asyncio.sleep(0.3)
                left = await c.exec("ps -eo args= | grep -c '^sleep 100' || true")
                return h, r, z, t, left

        h, r, z, t, left = run(go())
        assert h["pid"] == 1
        assert r["stdout"].split() == ["(3,", "11)", "1", "/workspace"], r
        assert z["stdout"].strip() == "0", "PID 1 must reap orphaned zombies"
        assert t["timed_out"] and t["exit_code"] == 137
        assert left["stdout"].strip() == "0"
        assert not (run_dir / "boot.json").exists()
        # SIGTERM to the agent (PID 1 inside, unshare's child outside): it exits 0, and so does unshare.
        [(agent_pid, _state)] = children_of(proc.pid)
        os.kill(agent_pid, signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:  # unshare ignores SIGTERM; SIGKILL + --kill-child ends the namespace
            proc.kill()
            proc.wait()
