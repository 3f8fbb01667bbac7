"""Template services: the template's own daemons, started and supervised by the guest agent.

The worker passes the template's ``[[services]]`` in boot.json; at start the agent spawns
each one (``/bin/sh -c command`` in its own session, through ``ProcTable.start`` with
``log_source="service"``, so its lines reach the log ring with source ``service``) and a
supervisor thread restarts it by its policy (``no`` | ``on-failure`` | ``always``) with an
exponential backoff (0.5 s doubling to 30 s; reset after 10 s of good running). Services
are not commands: they do not count in ``/status`` ``running_commands`` (a template's
Chromium must not keep its sandbox from being idle) and are not in ``/procs``.

Readiness (``tcp_port``, ``http_url`` or ``command``) is polled from the service's first
start until it passes or ``timeout_seconds`` pass; the worker waits on
``GET /services/wait?timeout=`` before it answers a create.

Routes: ``GET /services``, ``GET /services/wait?timeout=``.
"""

import os
import socket
import threading
import time

from _http import HTTPError, json_response

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 10.0  # a run this long resets the backoff
POLL_SECONDS = 0.1
CHECK_TIMEOUT = 2.0
MAX_WAIT_SECONDS = 600.0


def check_tcp(port, timeout):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True, None
    except OSError as e:
        return False, "tcp port %d: %s" % (port, e)


def check_http(url, timeout):
    """GET url; any answer below 500 counts as up. Plain sockets for http (no http.client:
    the agent stays small), urllib for https."""
    if url.startswith("https://"):
        import ssl
        import urllib.request

        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return r.status < 500, "%s answered %d" % (url, r.status)
        except Exception as e:  # noqa: BLE001 -- HTTPError (4xx) too
            code = getattr(e, "code", None)
            if isinstance(code, int) and code < 500:
                return True, None
            return False, "%s: %s" % (url, e)
    rest = url[len("http://"):]
    hostport, slash, path = rest.partition("/")
    path = "/" + path if slash else "/"
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, "80"
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: sandboxd-readiness\r\nConnection: close\r\n\r\n"
                       % (path, hostport)).encode("latin-1"))
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                data = s.recv(4096)
                if not data:
                    break
                head += data
    except OSError as e:
        return False, "%s: %s" % (url, e)
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        status = int(parts[1])
        return status < 500, "%s answered %d" % (url, status)
    return False, "%s: not an HTTP answer" % url


class Service:
    def __init__(self, table, spec):
        self.table = table
        self.name = spec["name"]
        self.command = spec["command"]
        self.user = spec.get("user") or "root"
        self.cwd = spec.get("cwd") or "/"
        self.env = spec.get("env") or {}
        self.restart = spec.get("restart") or "on-failure"
        self.readiness = spec.get("readiness") or None
        self.cond = table.cond
        self.proc = None
        self.state = "starting"  # starting | running | backoff | exited | failed
        self.ready = self.readiness is None
        self.ready_error = None  # why readiness failed (its timeout passed)
        self.last_check_error = None
        self.restarts = 0
        self.exit_code = None
        self.started = time.monotonic()
        self.ready_after = None

    def status(self):
        with self.cond:
            proc = self.proc
            return {
                "name": self.name,
                "command": self.command,
                "state": self.state,
                "pid": proc.pid if proc is not None and not proc.done else None,
                "ready": self.ready,
                "ready_after_seconds": self.ready_after,
                "error": self.ready_error,
                "restart": self.restart,
                "restarts": self.restarts,
                "last_exit_code": self.exit_code,
            }

    def _spawn(self):
        from _procs import resolve_user

        agent = self.table.agent
        env = dict(agent.base_env)
        env.update(self.env)
        user = None if self.user == "root" else resolve_user(self.user)
        cwd = self.cwd if os.path.isdir(self.cwd) else "/"
        return agent.procs.start(self.command, cwd, env, None, user, "", True, log_source="service")

    def supervise(self):
        logs = self.table.agent.logs
        failures = 0
        while not self.table.stopping:
            t0 = time.monotonic()
            try:
                proc = self._spawn()
            except HTTPError as e:
                logs.add("system", "service", "service %s cannot start: %s" % (self.name, e.message))
                proc = None
                code = 127
            else:
                with self.cond:
                    self.proc = proc
                    self.state = "running"
                    self.cond.notify_all()
                logs.add("system", "service", "service %s started (pid %d)" % (self.name, proc.pid))
                proc.wait(None)
                code = proc.exit_code
            if self.table.stopping:
                return
            logs.add("system", "service", "service %s exited with code %s" % (self.name, code))
            again = self.restart == "always" or (self.restart == "on-failure" and code != 0)
            with self.cond:
                self.exit_code = code
                self.state = "backoff" if again else ("exited" if code == 0 else "failed")
                self.cond.notify_all()
            if not again:
                return
            failures = 0 if time.monotonic() - t0 >= BACKOFF_RESET_AFTER else failures + 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))
            with self.cond:
                self.cond.wait_for(lambda: self.table.stopping, delay)
                self.restarts += 1

    def check(self):
        r = self.readiness
        if r.get("tcp_port"):
            return check_tcp(int(r["tcp_port"]), CHECK_TIMEOUT)
        if r.get("http_url"):
            return check_http(r["http_url"], CHECK_TIMEOUT)
        proc = self._check_command(r["command"])
        return proc

    def _check_command(self, command):
        from _procs import resolve_user

        agent = self.table.agent
        user = None if self.user == "root" else resolve_user(self.user)
        env = dict(agent.base_env)
        env.update(self.env)
        cwd = self.cwd if os.path.isdir(self.cwd) else "/"
        proc = agent.procs.start(command, cwd, env, CHECK_TIMEOUT * 2, user, "", True, log_source="quiet")
        proc.wait(None)
        if proc.exit_code == 0:
            return True, None
        return False, "readiness command exited with %s" % proc.exit_code

    def watch_readiness(self):
        timeout = float(self.readiness.get("timeout_seconds") or 30.0)
        deadline = self.started + timeout
        while not self.table.stopping:
            try:
                ok, why = self.check()
            except Exception as e:  # noqa: BLE001 -- a broken check is a failed check
                ok, why = False, "%s: %s" % (type(e).__name__, e)
            with self.cond:
                if ok:
                    self.ready = True
                    self.ready_after = round(time.monotonic() - self.started, 3)
                    self.cond.notify_all()
                    self.table.agent.logs.add("system", "service", "service %s is ready after %.2fs"
                                              % (self.name, self.ready_after))
                    return
                self.last_check_error = why
                if time.monotonic() >= deadline or self.state in ("exited", "failed"):
                    self.ready_error = "not ready after %gs: %s" % (timeout, why) if self.state not in (
                        "exited", "failed") else "exited with code %s before it was ready" % self.exit_code
                    self.state = "failed" if self.state not in ("exited", "failed") else self.state
                    self.cond.notify_all()
                    self.table.agent.logs.add("system", "service", "service %s %s" % (self.name, self.ready_error))
                    return
                self.cond.wait(POLL_SECONDS)


class ServiceTable:
    def __init__(self, agent, specs):
        self.agent = agent
        self.cond = threading.Condition()
        self.stopping = False
        self.services = [Service(self, s) for s in specs or []]

    def routes(self):
        return {"/services": {"GET": self.h_list}, "/services/wait": {"GET": self.h_wait}}

    def start(self):
        for svc in self.services:
            threading.Thread(target=svc.supervise, name="service-" + svc.name, daemon=True).start()
            if svc.readiness is not None:
                threading.Thread(target=svc.watch_readiness, name="ready-" + svc.name, daemon=True).start()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for svc in self.services:
            proc = svc.proc
            if proc is not None:
                proc.kill()

    def running(self):
        with self.cond:
            return sum(1 for s in self.services if s.state == "running")

    def settled(self):
        """(all ready, the first service that failed to become ready or None)."""
        for s in self.services:
            if not s.ready and s.ready_error is not None:
                return False, s
            if not s.ready and s.readiness is None and s.state in ("exited", "failed"):
                return False, s
        return all(s.ready for s in self.services), None

    def h_list(self, req):
        return json_response({"services": [s.status() for s in self.services]})

    def h_wait(self, req):
        try:
            timeout = float(req.query.get("timeout") or 30)
            if not 0 <= timeout <= MAX_WAIT_SECONDS:
                raise ValueError
        except ValueError:
            raise HTTPError(400, "invalid_parameter", "timeout must be 0 to %d seconds" % MAX_WAIT_SECONDS) from None
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ready, failed = self.settled()
                left = deadline - time.monotonic()
                if ready or failed is not None or left <= 0:
                    break
                self.cond.wait(min(left, 1.0))
        return json_response({
            "ready": ready,
            "failed": failed.name if failed is not None else None,
            "services": [s.status() for s in self.services],
        })
