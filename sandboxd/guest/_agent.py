"""The guest agent proper (see agent.py). Standard library only.

Threads, not asyncio: importing asyncio costs ~5 MiB of private memory (it pulls in ssl,
logging, concurrent.futures) and ~40 ms of start-up, per sandbox. The layout:

* main thread: accepts connections (one daemon thread each) and handles signals through
  ``signal.set_wakeup_fd``. It is the ONE reaper: on SIGCHLD it loops
  ``waitpid(-1, WNOHANG)``, hands the status of children the agent spawned to their
  waiter (through a pipe, so the waiting thread wakes from poll) and discards the rest
  (orphans re-parented to PID 1).
* connection threads: parse HTTP (``_http``), route, run handlers. ``/exec`` spawns with
  ``subprocess.Popen`` (never waited on by Popen itself: the reaper owns waitpid) under
  the children lock, so the reaper cannot reap a child before its waiter is registered.
"""

import codecs
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from itertools import repeat

import _http
from _http import HTTPError, json_response
from protocol import BOOT_CONFIG_NAME, GUEST_RUN_DIR, PROTOCOL_VERSION, SOCKET_NAME, WORKSPACE_DIR

try:
    from _operator import _compare_digest as compare_digest
except ImportError:  # pragma: no cover
    from hmac import compare_digest

AGENT_VERSION = "0.1.0"

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
}

DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 7 * 24 * 3600.0
DEFAULT_MAX_OUTPUT = 1024 * 1024
MAX_MAX_OUTPUT = 64 * 1024 * 1024
MAX_CONNECTIONS = 256
IDLE_CONNECTION_TIMEOUT = 600.0

LOG_MAX_ENTRIES = 10000
LOG_MAX_BYTES = 2 * 1024 * 1024
LOG_MAX_LINE = 16 * 1024
LOG_ENTRY_OVERHEAD = 64  # accounted bytes per entry on top of its text


def iso_us(us):
    """ISO 8601 UTC with microseconds and 'Z' for a unix time in microseconds."""
    s, frac = divmod(us, 1000000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + ".%06dZ" % frac


def parse_since(value):
    """Unix seconds (int/float) or ISO 8601 -> unix microseconds. Raises ValueError."""
    value = value.strip()
    if len(value) > 6 and value[-6] == " " and value[-3] == ":":
        value = value[:-6] + "+" + value[-5:]  # an unencoded "+00:00" arrives as " 00:00"
    try:
        f = float(value)
    except ValueError:
        pass
    else:
        if f != f or f in (float("inf"), float("-inf")):
            raise ValueError(value)
        return int(round(f * 1000000))
    from datetime import datetime, timezone

    v = value
    if v[-1:] in ("Z", "z"):
        v = v[:-1] + "+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1000000 + delta.microseconds


class LogRing:
    """Bounded in-memory log: at most LOG_MAX_ENTRIES lines and ~LOG_MAX_BYTES of text.

    Timestamps are unix microseconds, unique and strictly increasing, so ``since`` = the
    last timestamp a client saw returns exactly the newer lines.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries = deque()  # (ts_us, stream, source, text)
        self._bytes = 0
        self._last_us = 0

    def add_lines(self, stream, source, lines):
        n = len(lines)
        if not n:
            return
        if n > LOG_MAX_ENTRIES:  # the older ones would be evicted at once anyway
            lines = lines[-LOG_MAX_ENTRIES:]
            n = LOG_MAX_ENTRIES
        with self._lock:
            us0 = max(time.time_ns() // 1000, self._last_us + 1)
            self._last_us = us0 + n - 1
            entries = self._entries
            entries.extend(zip(range(us0, us0 + n), repeat(stream), repeat(source), lines))
            self._bytes += sum(map(len, lines)) + n * LOG_ENTRY_OVERHEAD
            excess = len(entries) - LOG_MAX_ENTRIES
            while excess > 0 or self._bytes > LOG_MAX_BYTES:
                e = entries.popleft()
                self._bytes -= len(e[3]) + LOG_ENTRY_OVERHEAD
                excess -= 1

    def add(self, stream, source, text):
        self.add_lines(stream, source, text.split("\n"))

    def query(self, since_us, limit):
        out = []
        truncated = False
        with self._lock:
            for e in reversed(self._entries):
                if since_us is not None and e[0] <= since_us:
                    break
                if len(out) == limit:
                    truncated = True
                    break
                out.append(e)
        out.reverse()
        return [{"ts": iso_us(e[0]), "stream": e[1], "source": e[2], "text": e[3]} for e in out], truncated


class LineLogger:
    """Splits one stream's bytes into lines for the log ring (UTF-8, errors replaced)."""

    __slots__ = ("ring", "stream", "source", "decoder", "pending")

    def __init__(self, ring, stream, source):
        self.ring = ring
        self.stream = stream
        self.source = source
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""

    def feed(self, data, final=False):
        text = self.pending + self.decoder.decode(data, final)
        if "\r" in text:
            text = text.replace("\r\n", "\n")
        lines = text.split("\n")
        self.pending = lines.pop()
        if final and self.pending:
            lines.append(self.pending)
            self.pending = ""
        while len(self.pending) > LOG_MAX_LINE:
            lines.append(self.pending[:LOG_MAX_LINE])
            self.pending = self.pending[LOG_MAX_LINE:]
        if lines:
            if max(map(len, lines)) > LOG_MAX_LINE:
                split = []
                for line in lines:
                    while len(line) > LOG_MAX_LINE:
                        split.append(line[:LOG_MAX_LINE])
                        line = line[LOG_MAX_LINE:]
                    split.append(line)
                lines = split
            self.ring.add_lines(self.stream, self.source, lines)

    def flush(self):
        self.feed(b"", final=True)


_CONN = threading.local()  # .sock: the connection the current thread serves (run_command watches it)


class _Waiter:
    __slots__ = ("fd", "status")

    def __init__(self, fd):
        self.fd = fd
        self.status = None


class Agent:
    def __init__(self, run_dir, workspace, boot):
        self.run_dir = run_dir
        self.workspace = workspace
        self.vm_id = boot.get("vm_id")
        self.token = boot["token"].encode("utf-8")
        self.hostname = boot.get("hostname") or socket.gethostname()
        env = dict(BASE_ENV)
        env["HOSTNAME"] = self.hostname
        env.update(boot.get("env") or {})
        if boot.get("path_prepend"):  # e.g. the agent CLI layer's bin dir, for exec
            env["PATH"] = ":".join(list(boot["path_prepend"]) + [env.get("PATH") or BASE_ENV["PATH"]])
        self.base_env = env
        self.started = time.monotonic()
        self.logs = LogRing()
        self.children_lock = threading.Lock()
        self.children = {}  # pid -> _Waiter, for processes the agent spawned
        self.running = {}  # pid -> pgid of running exec commands
        self.state_lock = threading.Lock()
        self.last_finished_us = None
        self.conn_count = 0
        self.listeners = []
        self.routes = {
            "/health": {"GET": self.h_health},
            "/status": {"GET": self.h_status},
            "/logs": {"GET": self.h_logs},
            "/exec": {"POST": self.h_exec},
        }
        from _procs import ProcTable

        self.procs = ProcTable(self)
        self.routes.update(self.procs.routes())
        from _files import Files  # file operations (upload, download, list, tar, watch)

        self.files = Files(self)
        self.routes.update(self.files.routes())
        from _services import ServiceTable  # the template's services (started by main)

        self.services = ServiceTable(self, boot.get("services"))
        self.routes.update(self.services.routes())

    # -- HTTP application -------------------------------------------------------------
    def check(self, req):
        auth = req.headers.get("authorization", "")
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() != "bearer" or not compare_digest(cred.strip().encode("utf-8", "replace"), self.token):
            raise HTTPError(401, "unauthorized", "missing or invalid Authorization bearer token")
        methods = self.routes.get(req.path)
        if methods is None:
            raise HTTPError(404, "not_found", "no such endpoint: %s" % req.path[:200])
        handler = methods.get(req.method)
        if handler is None:
            raise HTTPError(405, "method_not_allowed", "%s does not allow %s" % (req.path, req.method[:20]))
        return handler

    def on_error(self, req, exc):
        import traceback

        msg = "handler error on %s %s: %s" % (req.method, req.path, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        sys.stderr.write("sandboxd-agent: " + msg + "\n")
        self.logs.add("system", "agent", msg.rstrip("\n"))

    # -- endpoints --------------------------------------------------------------------
    def h_health(self, req):
        return json_response({
            "protocol": PROTOCOL_VERSION,
            "agent_version": AGENT_VERSION,
            "vm_id": self.vm_id,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self.started, 3),
        })

    def h_status(self, req):
        with self.state_lock:
            n = len(self.running)
            last = self.last_finished_us
        return json_response({
            "running_commands": n,
            "running_services": self.services.running(),  # never count as commands (idleness)
            "last_command_finished_at": iso_us(last) if last is not None else None,
            **self.files.status(),
        })

    def h_logs(self, req):
        q = req.query
        since = q.get("since")
        since_us = None
        if since:
            try:
                since_us = parse_since(since)
            except (ValueError, OverflowError, IndexError):
                raise HTTPError(400, "invalid_parameter", "since must be an ISO 8601 timestamp or unix seconds") from None
        limit = q.get("limit")
        if limit is None or limit == "":
            limit = 100
        else:
            try:
                limit = int(limit)
            except ValueError:
                limit = 0
            if not 1 <= limit <= LOG_MAX_ENTRIES:
                raise HTTPError(400, "invalid_parameter", "limit must be an integer from 1 to %d" % LOG_MAX_ENTRIES)
        entries, truncated = self.logs.query(since_us, limit)
        return json_response({"entries": entries, "truncated": truncated})

    def h_exec(self, req):
        body = req.json()
        command = body.get("command")
        if not isinstance(command, str) or not command:
            raise HTTPError(400, "invalid_field", "command is required and must be a non-empty string")
        if "\0" in command:
            raise HTTPError(400, "invalid_field", "command must not contain NUL characters")
        cwd = body.get("cwd")
        if cwd is None:
            cwd = self.workspace
        elif not isinstance(cwd, str) or not cwd or "\0" in cwd:
            raise HTTPError(400, "invalid_field", "cwd must be a non-empty path string")
        else:
            cwd = os.path.join(self.workspace, cwd)  # relative paths are relative to the workspace
        env = dict(self.base_env)
        req_env = body.get("env")
        if req_env is not None:
            if not isinstance(req_env, dict):
                raise HTTPError(400, "invalid_field", "env must be an object of string values")
            for k, v in req_env.items():
                if not k or "=" in k or "\0" in k:
                    raise HTTPError(400, "invalid_field", "env key %r is not a valid variable name" % k[:100])
                if not isinstance(v, str) or "\0" in v:
                    raise HTTPError(400, "invalid_field", "env.%s must be a string without NUL" % k[:100])
                env[k] = v
        timeout = body.get("timeout_seconds")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        elif isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT:
            raise HTTPError(400, "invalid_field", "timeout_seconds must be a number > 0 and <= %d" % MAX_TIMEOUT)
        max_out = body.get("max_output_bytes")
        if max_out is None:
            max_out = DEFAULT_MAX_OUTPUT
        elif isinstance(max_out, bool) or not isinstance(max_out, int) or not 0 <= max_out <= MAX_MAX_OUTPUT:
            raise HTTPError(400, "invalid_field", "max_output_bytes must be an integer from 0 to %d" % MAX_MAX_OUTPUT)
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise HTTPError(400, "invalid_field", "stdin must be a string")
        user = body.get("user")
        if user is not None:
            from _procs import resolve_user

            user = resolve_user(user)
        background = body.get("background", False)
        stream = body.get("stream", False)
        if not isinstance(background, bool) or not isinstance(stream, bool):
            raise HTTPError(400, "invalid_field", "background and stream must be booleans")
        # "agent": the worker's agent run (its output goes to the logs with source "agent")
        log_source = body.get("log_source", "exec")
        if log_source not in ("exec", "agent") or (log_source == "agent" and not background):
            raise HTTPError(400, "invalid_field", "log_source must be exec, or agent for a background process")
        if background and body.get("timeout_seconds") is None:
            timeout = None  # a background process lives as long as the sandbox unless told otherwise
        if not os.path.isdir(cwd):
            raise HTTPError(400, "cwd_not_found", "cwd %s is not an existing directory" % cwd[:500])
        if background or stream:
            proc = self.procs.start(command, cwd, env, None if timeout is None else float(timeout), user, stdin, background,
                                    log_source=log_source)
            if background:
                return json_response(proc.status(), 201)
            return _http.Response(200, self.procs.events(proc), [("Content-Type", "application/x-ndjson")])
        return json_response(self.run_command(command, cwd, env, float(timeout), max_out, stdin, user))

    # -- process management -----------------------------------------------------------
    def spawn(self, argv, cwd, env, stdin=False, user=None):
        """Popen in a new session; returns (popen, waiter_read_fd). Caller must finish().

        ``stdin``: True for a stdin pipe (else /dev/null); ``user``: a resolve_user() tuple."""
        import subprocess

        from _procs import user_env, user_kwargs

        r, w = os.pipe()
        waiter = _Waiter(w)
        try:
            with self.children_lock:
                p = subprocess.Popen(
                    argv, cwd=cwd, env=user_env(env, user), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                    **user_kwargs(user)
                )
                self.children[p.pid] = waiter
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        return p, waiter, r

    def run_command(self, command, cwd, env, timeout, max_out, stdin=None, user=None):
        from _procs import exit_code_of, forget_child, pump_output

        t0 = time.monotonic()
        try:
            p, waiter, notify_r = self.spawn(["/bin/sh", "-c", command], cwd, env, stdin is not None, user)
        except (FileNotFoundError, NotADirectoryError) as e:
            if not os.path.isdir(cwd):
                raise HTTPError(400, "cwd_not_found", "cwd %s is not an existing directory" % cwd[:500]) from None
            raise HTTPError(500, "spawn_failed", "cannot start /bin/sh: %s" % e) from None
        except PermissionError as e:
            raise HTTPError(400, "permission_denied", "cannot start the command: %s" % e) from None
        except OSError as e:
            raise HTTPError(500, "spawn_failed", "cannot start /bin/sh: %s" % e) from None
        pid = p.pid
        with self.state_lock:
            self.running[pid] = pid
        if p.stdin is not None:  # fed by a thread: a command may fill stdout before reading stdin
            data = stdin.encode("utf-8", "surrogatepass")
            stdin_file = p.stdin

            def feed():
                try:
                    stdin_file.write(data)
                except OSError:
                    pass
                finally:
                    try:
                        stdin_file.close()
                    except OSError:
                        pass

            if len(data) <= 16384:
                feed()
            else:
                threading.Thread(target=feed, daemon=True).start()
        out_fd, err_fd = p.stdout.fileno(), p.stderr.fileno()
        loggers = {out_fd: LineLogger(self.logs, "stdout", "exec"), err_fd: LineLogger(self.logs, "stderr", "exec")}
        chunks = {out_fd: [], err_fd: []}
        sizes = {out_fd: 0, err_fd: 0}
        combined = []
        combined_size = 0
        truncated = False

        def on_data(fd, data):
            nonlocal combined_size, truncated
            loggers[fd].feed(data)
            n = len(data)
            room = max_out - sizes[fd]
            if room > 0:
                chunks[fd].append(data if n <= room else data[:room])
            if n > room:
                truncated = True
            sizes[fd] += n
            room = max_out - combined_size
            if room > 0:
                combined.append(data if n <= room else data[:room])
            combined_size += n

        # The client hanging up (the worker cancelled the call) kills the command too.
        conn = getattr(_CONN, "sock", None)
        conn_fd = conn.fileno() if conn is not None else -1
        try:
            timed_out, _gone = pump_output(pid, (out_fd, err_fd), notify_r, t0 + timeout, on_data, hangup_fd=conn_fd)
        finally:
            for f in (p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            os.close(notify_r)
            forget_child(self, pid, waiter)
            for lg in loggers.values():
                lg.flush()
            with self.state_lock:
                self.running.pop(pid, None)
                self.last_finished_us = time.time_ns() // 1000
            exit_code = exit_code_of(waiter.status)
            p.returncode = exit_code  # Popen must never waitpid() on its own (the reaper does)
        return {
            "output": b"".join(combined).decode("utf-8", "replace"),
            "stdout": b"".join(chunks[out_fd]).decode("utf-8", "replace"),
            "stderr": b"".join(chunks[err_fd]).decode("utf-8", "replace"),
            "exit_code": exit_code,
            "timed_out": timed_out,
            "truncated": truncated or combined_size > max_out,
            "duration_ms": round((time.monotonic() - t0) * 1000, 3),
        }

    def reap(self):
        """Reap every exited child; PID 1 inherits orphans, whose statuses are discarded."""
        with self.children_lock:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                except InterruptedError:
                    continue
                if pid == 0:
                    return
                w = self.children.pop(pid, None)
                if w is not None:
                    w.status = status
                    try:
                        os.write(w.fd, b"x")
                    except OSError:
                        pass

    def kill_all(self):
        with self.state_lock:
            groups = list(self.running.values())
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass

    # -- serving ---------------------------------------------------------------------
    def _serve_conn(self, sock):
        _CONN.sock = sock
        try:
            _http.Connection(sock, self, IDLE_CONNECTION_TIMEOUT, self.on_error).serve()
        finally:
            with self.state_lock:
                self.conn_count -= 1

    def accept(self, lsock):
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:  # EMFILE and friends: do not spin, do not die
            sys.stderr.write("sandboxd-agent: accept failed: %s\n" % e)
            time.sleep(0.05)
            return
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.state_lock:
            if self.conn_count >= MAX_CONNECTIONS:
                full = True
            else:
                full = False
                self.conn_count += 1
        if full:
            try:
                sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: 79\r\n\r\n"
                             b'{"error":{"code":"too_many_connections","message":"too many open connections"}}')
            except OSError:
                pass
            sock.close()
            return
        threading.Thread(target=self._serve_conn, args=(sock,), daemon=True).start()


def _listen_unix(run_dir):
    path = os.path.join(run_dir, SOCKET_NAME)
    tmp = os.path.join(run_dir, ".%s.%d" % (SOCKET_NAME, os.getpid()))
    for p in (tmp,):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    os.chmod(tmp, 0o600)
    s.listen(128)
    os.replace(tmp, path)  # the socket appears only once it accepts connections
    return s, path


def _listen_tcp(spec):
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit("sandboxd-agent: --listen wants HOST:PORT, got %r" % spec)
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.create_server((host, int(port)), family=family, backlog=128)
    return s, "%s:%d" % (host, s.getsockname()[1])


def _set_subreaper():
    """Outside a PID namespace (tests on the host), become the orphans' reaper like PID 1."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def read_boot(run_dir):
    path = os.path.join(run_dir, BOOT_CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SystemExit("sandboxd-agent: %s not found" % path) from None
    try:
        os.unlink(path)  # it carries the token
    except OSError as e:
        sys.stderr.write("sandboxd-agent: cannot delete %s: %s\n" % (path, e))
    return parse_boot(raw, path)


def parse_boot(raw, path):
    try:
        boot = json.loads(raw)
    except ValueError:
        raise SystemExit("sandboxd-agent: %s is not valid JSON" % path) from None
    if not isinstance(boot, dict):
        raise SystemExit("sandboxd-agent: %s must be a JSON object" % path)
    if boot.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise SystemExit("sandboxd-agent: boot protocol %r, agent speaks %d" % (boot.get("protocol"), PROTOCOL_VERSION))
    token = boot.get("token")
    if not isinstance(token, str) or not token:
        raise SystemExit("sandboxd-agent: boot config lacks a token")
    env = boot.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and "\0" not in k and isinstance(v, str) and "\0" not in v
        for k, v in env.items()
    ):
        raise SystemExit("sandboxd-agent: boot env must map names to strings")
    for key in ("vm_id", "hostname"):
        if boot.get(key) is not None and not isinstance(boot.get(key), str):
            raise SystemExit("sandboxd-agent: boot %s must be a string" % key)
    pre = boot.get("path_prepend") or []
    if not isinstance(pre, list) or not all(
        isinstance(d, str) and d.startswith("/") and ":" not in d and "\0" not in d for d in pre
    ):
        raise SystemExit("sandboxd-agent: boot path_prepend must be a list of absolute directories")
    services = boot.get("services") or []
    if not isinstance(services, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("command"), str)
        for s in services
    ):
        raise SystemExit("sandboxd-agent: boot services must be a list of {name, command, ...}")
    return boot


def parse_args(argv):
    opts = {"run_dir": GUEST_RUN_DIR, "listen": None, "workspace": WORKSPACE_DIR, "boot_port": None}
    it = iter(argv)
    for arg in it:
        name, eq, val = arg.partition("=")
        key = {"--run-dir": "run_dir", "--listen": "listen", "--workspace": "workspace",
               "--boot-port": "boot_port"}.get(name)
        if key is None:
            raise SystemExit("usage: agent.py [--run-dir DIR] [--listen HOST:PORT] [--workspace DIR] [--boot-port DEV]")
        if not eq:
            val = next(it, None)
            if val is None:
                raise SystemExit("sandboxd-agent: %s needs a value" % name)
        opts[key] = val
    return opts


def main(argv):
    opts = parse_args(argv)
    os.umask(0o022)
    if opts["boot_port"]:  # a microVM: the worker sends the config over virtio-serial (_vmboot)
        from _vmboot import await_boot

        boot = await_boot(opts["boot_port"], parse_boot)
    else:
        boot = read_boot(opts["run_dir"])
    os.makedirs(opts["workspace"], exist_ok=True)
    agent = Agent(opts["run_dir"], opts["workspace"], boot)
    if os.getpid() == 1:
        hn = boot.get("hostname")
        if hn and hn != socket.gethostname():
            try:
                socket.sethostname(hn)
            except OSError:
                pass
    else:
        _set_subreaper()

    # Signals arrive as bytes on a pipe the main loop polls (handlers only set the fd).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    noop = lambda *_: None  # noqa: E731
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, noop)

    if opts["listen"]:
        lsock, where = _listen_tcp(opts["listen"])
        sock_path = None
    else:
        lsock, sock_path = _listen_unix(opts["run_dir"])
        where = sock_path
    lsock.setblocking(False)
    agent.listeners.append(lsock)
    agent.logs.add("system", "agent", "sandboxd agent %s started (pid %d, protocol %d)"
                   % (AGENT_VERSION, os.getpid(), PROTOCOL_VERSION))
    sys.stderr.write("sandboxd-agent: ready on %s\n" % where)
    sys.stderr.flush()
    agent.services.start()

    import select

    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    poller.register(lsock.fileno(), select.POLLIN)
    lfd = lsock.fileno()
    agent.reap()
    while True:
        try:
            events = poller.poll(10000)
        except InterruptedError:
            events = []
        stop = False
        if not events:
            agent.reap()  # belt and braces: a lost SIGCHLD must not leave zombies forever
        for fd, _ev in events:
            if fd == lfd:
                agent.accept(lsock)
                continue
            try:
                sigs = os.read(wake_r, 256)
            except BlockingIOError:
                sigs = b""
            if signal.SIGCHLD in sigs:
                agent.reap()
            if signal.SIGTERM in sigs or signal.SIGINT in sigs:
                stop = True
        if stop:
            break

    # Shutdown: stop accepting, kill running command groups, exit 0.
    lsock.close()
    if sock_path:
        try:
            os.unlink(sock_path)
        except OSError:
            pass
    agent.services.stop()
    agent.kill_all()
    sys.stderr.write("sandboxd-agent: stopping\n")
    sys.stderr.flush()
    os._exit(0)
