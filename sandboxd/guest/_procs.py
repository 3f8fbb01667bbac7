"""Processes of the guest agent: streaming exec, background processes, PTY sessions.

Standard library only, threads (see _agent). Every process is spawned under the agent's
``children_lock`` and registered in ``agent.children`` so the ONE reaper (the main thread)
hands its wait status to the process's pump thread through a pipe.

* :class:`Proc` -- one spawned ``/bin/sh -c`` with stdout/stderr captured into a bounded
  buffer of ``(offset, stream, bytes)`` chunks (offsets count both streams' bytes, so a
  follower resumes with ``since_offset``), an optional stdin pipe, an optional deadline
  after which its whole session is SIGKILLed, and a condition variable for followers.
* a streaming exec (``/exec`` with ``"stream": true``) answers NDJSON events while the
  command runs; if the connection breaks (the peer stops reading: heartbeats every
  second detect it) the command's session is killed unless it runs in the background.
* ``/pty`` hijacks the connection after ``101`` and speaks a binary framing:
  1 byte type + 4 bytes big-endian length + payload. Types: ``d`` data (both ways),
  ``r`` resize (``!HH`` cols, rows; client -> agent), ``x`` exit (JSON
  ``{"exit_code"}``; agent -> client, last frame). Closing the connection kills the
  PTY's session.

Routes (query parameters, since the agent's router matches exact paths):
``GET /procs``, ``GET /procs/get?id=``, ``GET /procs/output?id=&since_offset=&follow=``,
``POST /procs/stdin?id=&eof=`` (raw body), ``POST /procs/signal`` ``{"id","signal"}``,
``POST /procs/wait?id=&timeout=``, ``GET /pty?cols=&rows=&command=&user=&cwd=``.
"""

import codecs
import errno
import json
import os
import signal
import struct
import threading
import time

import _http
from _http import HTTPError, Response, json_response

PROC_BUFFER_BYTES = 1024 * 1024  # retained output per process (oldest chunks dropped)
MAX_FINISHED = 16  # exited background processes kept for status/output reads (1 MiB each at most)
HEARTBEAT_SECONDS = 1.0
MAX_WAIT_SECONDS = 300.0
STDIN_WRITE_TIMEOUT = 10.0
DRAIN_SECONDS = 0.025  # after the main process exits, how long to wait for the pipes' EOF
KILL_WAIT_SECONDS = 10.0  # after SIGKILL of a timed-out session, how long to wait for its leader
READ_SIZE = 65536

SIGNALS = {
    name: getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                 "SIGSTOP", "SIGCONT", "SIGWINCH", "SIGALRM")
}

FRAME_DATA, FRAME_RESIZE, FRAME_EXIT = b"d", b"r", b"x"
_HDR = struct.Struct("!cI")
MAX_FRAME = 1024 * 1024


def iso_now():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%06dZ" % int((t % 1) * 1000000)


def session_members(sid):
    """PIDs whose session id is ``sid`` (from /proc/*/stat)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            if int(fields[3]) == sid:  # state ppid pgrp session
                out.append(int(name))
        except (IndexError, ValueError):
            pass
    return out


def kill_session(sid, sig=signal.SIGKILL):
    """Signal the process group ``sid`` and every other process of session ``sid``."""
    try:
        os.killpg(sid, sig)
    except OSError:
        pass
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except OSError:
            pass

def exit_code_of(status):
    """The shell's convention for a waitpid() status: the exit code, or 128+N for signal N
    (128+SIGKILL when the process was given up on and never reaped)."""
    if status is None:
        return 128 + signal.SIGKILL
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def forget_child(agent, pid, waiter):
    """Stop waiting for pid: a child that never exited is left to the reaper to discard."""
    with agent.children_lock:
        if agent.children.get(pid) is waiter:
            del agent.children[pid]
        os.close(waiter.fd)


def _peer_closed(fd):
    """True when the connected socket fd reads EOF (peeked: nothing is consumed)."""
    import socket

    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.close()


def pump_output(pid, fds, notify_r, deadline, on_data, on_timeout=None, hangup_fd=-1):
    """Read a command's pipes until it has exited and they drained (DRAIN_SECONDS at most
    after its exit). At `deadline` (monotonic; None for no limit), or when `hangup_fd`
    reports its peer gone, kill the command's session and wait KILL_WAIT_SECONDS for it.
    on_data(fd, bytes) gets every chunk; returns (timed_out, gone)."""
    import select

    open_fds = set(fds)
    poller = select.poll()
    for fd in list(open_fds) + [notify_r]:
        poller.register(fd, select.POLLIN)
    if hangup_fd >= 0:  # POLLIN too: gVisor's TCP reports a peer's close only as EOF
        poller.register(hangup_fd, select.POLLRDHUP | select.POLLIN)
    timed_out = gone = exited = False
    end_by = None  # after exit: the drain deadline; after a kill: the give-up deadline
    while True:
        now = time.monotonic()
        if exited and (not open_fds or now >= end_by):
            break
        if not exited:
            if deadline is not None and not timed_out and not gone and now >= deadline:
                timed_out = True
                if on_timeout is not None:
                    on_timeout()
                kill_session(pid)  # its group and any other group of its session
                end_by = now + KILL_WAIT_SECONDS
                continue
            if timed_out or gone:
                if now >= end_by:
                    break  # leader unkillable (D state?): give up waiting
                wait = end_by - now
            elif deadline is not None:
                wait = deadline - now
            else:
                wait = 60.0
        else:
            wait = end_by - now
        try:
            events = poller.poll(max(0, int(wait * 1000) + 1))
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == hangup_fd:
                poller.unregister(hangup_fd)
                if ev & select.POLLIN and not ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) \
                        and not _peer_closed(hangup_fd):
                    continue  # bytes from a client still there (a pipelined request): not a hang-up
                if not exited and not timed_out:
                    gone = True
                    kill_session(pid)
                    end_by = time.monotonic() + KILL_WAIT_SECONDS
                continue
            if fd == notify_r:
                os.read(notify_r, 16)
                poller.unregister(notify_r)
                exited = True
                end_by = time.monotonic() + DRAIN_SECONDS
                continue
            if fd not in open_fds:
                continue
            try:
                data = os.read(fd, READ_SIZE)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                data = b""
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            on_data(fd, data)
    return timed_out, gone



def resolve_user(name):
    """``name`` -> (uid, gid, extra_groups, home, name); HTTPError 400 if unknown."""
    import pwd

    if not isinstance(name, str) or not name or "\0" in name or len(name) > 64:
        raise HTTPError(400, "invalid_user", "user must be a user name")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise HTTPError(400, "unknown_user", "user %r does not exist in the sandbox" % name[:64]) from None
    try:
        groups = [g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid]
    except OSError:
        groups = []
    return pw.pw_uid, pw.pw_gid, groups, pw.pw_dir or "/", pw.pw_name


def user_env(env, user):
    if user is not None:
        env = dict(env)
        env["HOME"] = user[3]
        env["USER"] = env["LOGNAME"] = user[4]
    return env


def user_kwargs(user):
    if user is None:
        return {}
    uid, gid, groups, _home, _name = user
    return {"user": uid, "group": gid, "extra_groups": groups}


class Proc:
    """One spawned command with its captured output (see module docstring)."""

    def __init__(self, table, proc_id, pid, command, cwd, user_name, background, timeout, stdin_fd, tty=False):
        self.table = table
        self.id = proc_id
        self.pid = pid
        self.command = command
        self.cwd = cwd
        self.user = user_name
        self.background = background
        self.timeout = timeout
        self.tty = tty
        self.stdin_fd = stdin_fd
        self.stdin_lock = threading.Lock()
        self.cond = threading.Condition()
        self.chunks = []  # (offset, stream, bytes)
        self.base = 0  # offset of the first retained byte
        self.end = 0  # offset after the last byte
        self.retained = 0
        self.exit_code = None
        self.timed_out = False
        self.killed = False
        self.done = False
        self.t0 = time.monotonic()
        self.started_at = iso_now()
        self.pinned = False  # the agent run: kept after exit (see ProcTable.finished)
        self.service = False  # a template service (or its readiness check): not a command
        self.finished_at = None
        self.duration_ms = None

    # -- output buffer ---------------------------------------------------------------
    def append(self, stream, data):
        with self.cond:
            if not self.background:
                # A foreground stream has one reader, which drops what it sent (consumed):
                # when it lags a full buffer behind, stop reading the pipes, so the command
                # blocks on its writes instead of losing output (until the deadline).
                while self.retained > PROC_BUFFER_BYTES and not self.killed:
                    left = None if self.timeout is None else self.t0 + self.timeout - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(1.0 if left is None else min(left, 1.0))
            self.chunks.append((self.end, stream, data))
            self.end += len(data)
            self.retained += len(data)
            while self.background and self.retained > PROC_BUFFER_BYTES and len(self.chunks) > 1:
                _off, _s, old = self.chunks.pop(0)
                self.retained -= len(old)
                self.base = self.chunks[0][0]
            self.cond.notify_all()

    def read(self, since, timeout=None):
        """Chunks at or after ``since``; waits up to ``timeout`` for news when there are none.
        Returns (chunks, next_offset, done)."""
        with self.cond:
            if timeout is not None and self.end <= since and not self.done:
                self.cond.wait(timeout)
            out = []
            for off, stream, data in self.chunks:
                if off + len(data) <= since:
                    continue
                if off < since:
                    data = data[since - off:]
                    off = since
                out.append((off, stream, data))
            return out, max(self.end, since), self.done

    def consumed(self, offset):
        """Drops the chunks before ``offset`` (foreground streams: the one reader sent them)."""
        with self.cond:
            while self.chunks and self.chunks[0][0] + len(self.chunks[0][2]) <= offset:
                self.retained -= len(self.chunks.pop(0)[2])
            self.base = self.chunks[0][0] if self.chunks else self.end
            self.cond.notify_all()

    def status(self):
        with self.cond:
            doc = {
                "process_id": self.id,
                "pid": self.pid,
                "command": self.command,
                "cwd": self.cwd,
                "user": self.user,
                "background": self.background,
                "tty": self.tty,
                "state": "exited" if self.done else "running",
                "exit_code": self.exit_code,
                "timed_out": self.timed_out,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "duration_ms": self.duration_ms,
                "output_bytes": self.end,
                "stdin_open": self.stdin_fd is not None,
            }
            if self.timeout is not None:
                doc["timeout_seconds"] = self.timeout
        return doc

    def wait(self, timeout):
        with self.cond:
            if not self.done:
                self.cond.wait_for(lambda: self.done, timeout)
            return self.done

    # -- control ---------------------------------------------------------------------
    def kill(self):
        if not self.done:
            with self.cond:
                self.killed = True
                self.cond.notify_all()
            kill_session(self.pid)

    def signal(self, sig):
        if self.done:
            raise HTTPError(409, "process_exited", "process %s has exited" % self.id)
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            raise HTTPError(409, "process_exited", "process %s has exited" % self.id) from None

    def write_stdin(self, data, eof):
        with self.stdin_lock:
            fd = self.stdin_fd
            if fd is None:
                raise HTTPError(409, "stdin_closed", "the stdin of process %s is closed" % self.id)
            import select

            view = memoryview(data)
            deadline = time.monotonic() + STDIN_WRITE_TIMEOUT
            try:
                while view:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise HTTPError(409, "stdin_full", "process %s does not read its stdin" % self.id)
                    r = select.select([], [fd], [], left)[1]
                    if not r:
                        continue
                    try:
                        n = os.write(fd, view[:65536])
                    except BlockingIOError:
                        continue
                    view = view[n:]
            except OSError:
                self._close_stdin()
                raise HTTPError(409, "stdin_closed", "process %s closed its stdin" % self.id) from None
            if eof:
                self._close_stdin()

    def _close_stdin(self):
        fd, self.stdin_fd = self.stdin_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- pump (one thread per process) ------------------------------------------------
    def pump(self, out_fd, err_fd, notify_r, waiter, loggers):
        agent = self.table.agent
        names = {out_fd: "stdout", err_fd: "stderr"}

        def on_data(fd, data):
            loggers[fd].feed(data)
            self.append(names[fd], data)

        def on_timeout():
            self.timed_out = True

        deadline = self.t0 + self.timeout if self.timeout is not None else None
        fds = [fd for fd in (out_fd, err_fd) if fd is not None]
        try:
            pump_output(self.pid, fds, notify_r, deadline, on_data, on_timeout)
        finally:
            for fd in (out_fd, err_fd, notify_r):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            forget_child(agent, self.pid, waiter)
            for lg in loggers.values():
                lg.flush()
            with self.stdin_lock:
                self._close_stdin()
            code = exit_code_of(waiter.status)
            if not self.service:
                with agent.state_lock:
                    agent.running.pop(self.pid, None)
                    agent.last_finished_us = time.time_ns() // 1000
            with self.cond:
                self.exit_code = code
                self.done = True
                self.finished_at = iso_now()
                self.duration_ms = round((time.monotonic() - self.t0) * 1000, 3)
                self.cond.notify_all()
            self.table.finished(self)


class _NullLogger:
    """Drops a stream's lines (readiness checks must not flood the log ring)."""

    @staticmethod
    def feed(data, final=False):
        pass

    @staticmethod
    def flush():
        pass


def _bool(value):
    return value in ("1", "true", "yes", "on")


class ProcTable:
    def __init__(self, agent):
        self.agent = agent
        self.lock = threading.Lock()
        self.procs = {}  # id -> Proc (background ones, and finished ones until evicted)
        self.finished_order = []
        self.counter = 0

    def routes(self):
        return {
            "/procs": {"GET": self.h_list},
            "/procs/get": {"GET": self.h_get},
            "/procs/output": {"GET": self.h_output},
            "/procs/stdin": {"POST": self.h_stdin},
            "/procs/signal": {"POST": self.h_signal},
            "/procs/wait": {"POST": self.h_wait},
            "/pty": {"GET": self.h_pty},
        }

    # -- spawning --------------------------------------------------------------------
    def start(self, command, cwd, env, timeout, user=None, stdin_data=None, background=False, log_source="exec"):
        """Spawn ``/bin/sh -c command`` with a pump thread; returns the Proc.

        ``log_source`` "agent" marks the worker's agent run: its lines are logged with that
        source and, once exited, it is never evicted (the worker reads its exit code)."""
        import subprocess

        from _agent import LineLogger, _Waiter

        agent = self.agent
        env = user_env(env, user)
        r, w = os.pipe()
        waiter = _Waiter(w)
        want_stdin = background or stdin_data is not None
        try:
            with agent.children_lock:
                p = subprocess.Popen(
                    ["/bin/sh", "-c", command], cwd=cwd, env=env,
                    stdin=subprocess.PIPE if want_stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                    **user_kwargs(user)
                )
                agent.children[p.pid] = waiter
        except BaseException as e:
            os.close(r)
            os.close(w)
            if isinstance(e, (FileNotFoundError, NotADirectoryError)) and not os.path.isdir(cwd):
                raise HTTPError(400, "cwd_not_found", "cwd %s is not an existing directory" % cwd[:500]) from None
            if isinstance(e, PermissionError):
                raise HTTPError(400, "permission_denied", "cannot start the command: %s" % e) from None
            if isinstance(e, OSError):
                raise HTTPError(500, "spawn_failed", "cannot start /bin/sh: %s" % e) from None
            raise
        p.returncode = 0  # Popen must never waitpid() on its own (the reaper does)
        stdin_fd = None
        if p.stdin is not None:
            stdin_fd = os.dup(p.stdin.fileno())
            p.stdin.close()
            os.set_blocking(stdin_fd, False)
        out_fd, err_fd = os.dup(p.stdout.fileno()), os.dup(p.stderr.fileno())
        p.stdout.close()
        p.stderr.close()
        # "service"/"quiet" (a template service, its readiness command): not a command, so
        # not counted in running_commands and not listed in /procs (see _services.py)
        service = log_source in ("service", "quiet")
        if not service:
            with agent.state_lock:
                agent.running[p.pid] = p.pid
        if service:  # user-visible ids stay proc_1, proc_2, ... whatever the template runs
            proc_id = "svc_%d" % p.pid
        else:
            with self.lock:
                self.counter += 1
                proc_id = "proc_%d" % self.counter
        proc = Proc(self, proc_id, p.pid, command, cwd, user[4] if user else "root", background, timeout, stdin_fd)
        proc.pinned = log_source == "agent"
        proc.service = service
        if log_source == "quiet":
            loggers = {out_fd: _NullLogger, err_fd: _NullLogger}
        else:
            loggers = {out_fd: LineLogger(agent.logs, "stdout", log_source),
                       err_fd: LineLogger(agent.logs, "stderr", log_source)}
        if background and not service:
            with self.lock:
                self.procs[proc.id] = proc
        threading.Thread(target=proc.pump, args=(out_fd, err_fd, r, waiter, loggers), daemon=True).start()
        if stdin_data is not None:
            data = stdin_data.encode("utf-8", "surrogatepass") if isinstance(stdin_data, str) else stdin_data

            def feed():
                try:
                    proc.write_stdin(data, True)
                except HTTPError:
                    pass

            if len(data) <= 65536:
                feed()  # fits a pipe buffer: no thread needed
            else:
                threading.Thread(target=feed, daemon=True).start()
        return proc

    def finished(self, proc):
        if not proc.background or proc.pinned or proc.service:
            return
        with self.lock:
            self.finished_order.append(proc.id)
            while len(self.finished_order) > MAX_FINISHED:
                self.procs.pop(self.finished_order.pop(0), None)

    def get(self, req):
        pid = req.query.get("id", "")
        with self.lock:
            proc = self.procs.get(pid)
        if proc is None:
            raise HTTPError(404, "process_not_found", "no process %r" % pid[:64])
        return proc

    # -- streaming -------------------------------------------------------------------
    def events(self, proc, since=0, kill_on_close=True):
        """NDJSON event stream of ``proc`` from offset ``since``; ends with an exit event."""
        decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")("replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")("replace"),
        }
        if since < proc.base:
            since = proc.base
        complete = False
        try:
            while True:
                chunks, nxt, done = proc.read(since, HEARTBEAT_SECONDS)
                lines = []
                for off, stream, data in chunks:
                    text = decoders[stream].decode(data)
                    if text:
                        lines.append(json.dumps({"type": stream, "data": text, "offset": off},
                                                ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
                since = nxt
                if not proc.background:
                    proc.consumed(since)
                if done:
                    st = proc.status()
                    for stream, dec in decoders.items():
                        tail = dec.decode(b"", True)
                        if tail:
                            lines.append(json.dumps({"type": stream, "data": tail, "offset": since}).encode() + b"\n")
                    lines.append(json.dumps({"type": "exit", "exit_code": st["exit_code"], "timed_out": st["timed_out"],
                                             "duration_ms": st["duration_ms"], "next_offset": since}).encode() + b"\n")
                    complete = True
                    yield b"".join(lines)
                    return
                yield b"".join(lines) if lines else b'{"type":"heartbeat"}\n'
        finally:
            if kill_on_close and not complete and not proc.background:
                proc.kill()

    # -- handlers --------------------------------------------------------------------
    def h_list(self, req):
        with self.lock:
            procs = list(self.procs.values())
        return json_response({"processes": [p.status() for p in procs]})

    def h_get(self, req):
        return json_response(self.get(req).status())

    def h_output(self, req):
        proc = self.get(req)
        try:
            since = int(req.query.get("since_offset") or 0)
            if since < 0:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "invalid_parameter", "since_offset must be a non-negative integer") from None
        if _bool(req.query.get("follow", "")):
            return Response(200, self.events(proc, since, kill_on_close=False), [("Content-Type", "application/x-ndjson")])
        chunks, nxt, done = proc.read(since)
        parts = {"stdout": [], "stderr": []}
        for _off, stream, data in chunks:
            parts[stream].append(data)
        st = proc.status()
        return json_response({
            "process_id": proc.id,
            "output": b"".join(c[2] for c in chunks).decode("utf-8", "replace"),
            "stdout": b"".join(parts["stdout"]).decode("utf-8", "replace"),
            "stderr": b"".join(parts["stderr"]).decode("utf-8", "replace"),
            "since_offset": max(since, proc.base) if chunks or since < proc.base else since,
            "next_offset": nxt,
            "truncated": since < proc.base,
            "state": st["state"],
            "exit_code": st["exit_code"],
            "timed_out": st["timed_out"],
        })

    def h_stdin(self, req):
        proc = self.get(req)
        proc.write_stdin(req.body, _bool(req.query.get("eof", "")))
        return json_response(proc.status())

    def h_signal(self, req):
        body = req.json()
        with self.lock:
            proc = self.procs.get(body.get("id") if isinstance(body.get("id"), str) else "")
        if proc is None:
            raise HTTPError(404, "process_not_found", "no process %r" % str(body.get("id"))[:64])
        name = body.get("signal", "SIGTERM")
        if not isinstance(name, str) or name.upper() not in SIGNALS and "SIG" + name.upper() not in SIGNALS:
            raise HTTPError(400, "invalid_signal", "signal must be one of %s" % ", ".join(sorted(SIGNALS)))
        name = name.upper() if name.upper() in SIGNALS else "SIG" + name.upper()
        proc.signal(SIGNALS[name])
        return json_response(dict(proc.status(), signal=name))

    def h_wait(self, req):
        proc = self.get(req)
        try:
            timeout = float(req.query.get("timeout") or 30)
            if not 0 <= timeout <= MAX_WAIT_SECONDS:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "invalid_parameter", "timeout must be 0 to %d seconds" % MAX_WAIT_SECONDS) from None
        proc.wait(timeout)
        return json_response(proc.status())

    # -- PTY -------------------------------------------------------------------------
    def h_pty(self, req):
        import fcntl
        import subprocess
        import termios

        q = req.query
        try:
            cols = int(q.get("cols") or 80)
            rows = int(q.get("rows") or 24)
            if not (1 <= cols <= 1000 and 1 <= rows <= 1000):
                raise ValueError
        except ValueError:
            raise HTTPError(400, "invalid_parameter", "cols and rows must be integers from 1 to 1000") from None
        command = q.get("command") or None
        if command is not None and "\0" in command:
            raise HTTPError(400, "invalid_field", "command must not contain NUL")
        user = resolve_user(q["user"]) if q.get("user") else None
        cwd = q.get("cwd") or None
        if cwd is None:
            cwd = user[3] if user is not None and os.path.isdir(user[3]) else self.agent.workspace
        else:
            cwd = os.path.join(self.agent.workspace, cwd)
        if not os.path.isdir(cwd):
            raise HTTPError(400, "cwd_not_found", "cwd %s is not an existing directory" % cwd[:500])
        env = user_env(dict(self.agent.base_env), user)
        env["TERM"] = q.get("term") or "xterm-256color"
        if command is None:
            argv = ["/bin/bash", "-l"] if os.path.exists("/bin/bash") else ["/bin/sh", "-l"]
        else:
            argv = ["/bin/sh", "-c", command]
        agent = self.agent
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        tiocsctty = termios.TIOCSCTTY

        def ctty():
            fcntl.ioctl(0, tiocsctty, 0)

        from _agent import _Waiter

        r, w = os.pipe()
        waiter = _Waiter(w)
        try:
            with agent.children_lock:
                p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, close_fds=True, preexec_fn=ctty, **user_kwargs(user))
                agent.children[p.pid] = waiter
        except BaseException as e:
            for fd in (master, slave, r, w):
                os.close(fd)
            if isinstance(e, OSError):
                raise HTTPError(500, "spawn_failed", "cannot start the terminal: %s" % e) from None
            raise
        p.returncode = 0
        os.close(slave)
        with agent.state_lock:
            agent.running[p.pid] = p.pid
        return _http.Hijack(lambda sock, buffered: self._pty_session(sock, buffered, p.pid, master, r, waiter))

    def _pty_session(self, sock, buffered, pid, master, notify_r, waiter):
        import fcntl
        import select
        import termios

        agent = self.agent
        send_lock = threading.Lock()
        closed = threading.Event()

        def send(ftype, payload):
            with send_lock:
                sock.sendall(_HDR.pack(ftype, len(payload)) + payload)

        def out_loop():  # master -> socket, then the exit frame
            exited = False
            poller = select.poll()
            poller.register(master, select.POLLIN)
            poller.register(notify_r, select.POLLIN)
            end_by = None
            try:
                while True:
                    if exited and time.monotonic() >= end_by:
                        break
                    events = poller.poll(50 if exited else 1000)
                    for fd, _ev in events:
                        if fd == notify_r:
                            os.read(notify_r, 16)
                            poller.unregister(notify_r)
                            exited = True
                            end_by = time.monotonic() + 0.05
                            continue
                        try:
                            data = os.read(master, READ_SIZE)
                        except OSError:  # EIO: every slave fd closed
                            data = b""
                        if not data:
                            poller.unregister(master)
                            if not exited:
                                time.sleep(0.01)
                            continue
                        send(FRAME_DATA, data)
                    if closed.is_set():
                        break
                code = exit_code_of(waiter.status)
                send(FRAME_EXIT, json.dumps({"exit_code": code}).encode())
            except OSError:
                pass
            finally:
                closed.set()
                try:
                    sock.shutdown(2)
                except OSError:
                    pass

        try:
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: sandboxd-pty\r\nConnection: Upgrade\r\n\r\n")
        except OSError:
            closed.set()
        reader = None
        if not closed.is_set():
            reader = threading.Thread(target=out_loop, daemon=True)
            reader.start()
        buf = bytearray(buffered)
        try:
            sock.settimeout(None)
            while not closed.is_set():
                while len(buf) >= 5:
                    ftype, n = _HDR.unpack(bytes(buf[:5]))
                    if n > MAX_FRAME:
                        raise OSError("frame too large")
                    if len(buf) < 5 + n:
                        break
                    payload = bytes(buf[5:5 + n])
                    del buf[:5 + n]
                    if ftype == FRAME_DATA:
                        view = memoryview(payload)
                        while view:
                            try:
                                view = view[os.write(master, view):]
                            except BlockingIOError:
                                time.sleep(0.005)
                    elif ftype == FRAME_RESIZE and n == 4:
                        cols, rows = struct.unpack("!HH", payload)
                        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                        try:
                            os.killpg(pid, signal.SIGWINCH)
                        except OSError:
                            pass
                data = sock.recv(READ_SIZE)
                if not data:
                    break
                buf += data
        except OSError:
            pass
        finally:
            closed.set()
            kill_session(pid)  # the client went away (or the session ended): nothing stays
            if reader is not None:
                reader.join(KILL_WAIT_SECONDS)
            forget_child(agent, pid, waiter)
            for fd in (master, notify_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            with agent.state_lock:
                agent.running.pop(pid, None)
                agent.last_finished_us = time.time_ns() // 1000
