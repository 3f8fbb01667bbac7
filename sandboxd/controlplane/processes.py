"""Processes and PTYs of a sandbox: streaming and background exec, the process table
(list, status, output, stdin, signal, wait) and interactive terminals.

Like SandboxService it never sees HTTP: the API layer (sandboxd/api/processes.py) hands it
validated values; it checks tenancy (404/409 through ``SandboxService.get_running``),
counts the calls as activity, and asks the sandbox's worker, whose guest agent does the
work (sandboxd/guest/_procs.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anyio

from sandboxd.api.schemas import ExecRequest
from sandboxd.controlplane.service import Caller, SandboxService
from sandboxd.errors import BadRequest, NotFound
from sandboxd.worker.interface import ExecCommand, PtySession, WorkerAPI

PROCESS_ID_RE = re.compile(r"^proc_[0-9]{1,10}$")
SIGNALS = ("SIGTERM", "SIGINT", "SIGKILL", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
           "SIGSTOP", "SIGCONT", "SIGWINCH", "SIGALRM")  # fmt: skip
MAX_WAIT_SECONDS = 300.0
WAIT_MARGIN_SECONDS = 10.0


def signal_name(value: str) -> str:
    """``TERM``, ``sigterm``, ``SIGTERM`` -> ``SIGTERM``; 400 for anything off the list."""
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in SIGNALS:
        raise BadRequest(f"signal: must be one of {', '.join(SIGNALS)}", code="invalid_signal", field="signal")
    return name


def exec_command(request: ExecRequest) -> ExecCommand:
    timeout = request.timeout_seconds
    if request.background and "timeout_seconds" not in request.model_fields_set:
        timeout = None  # a background process lives as long as the sandbox unless told otherwise
    return ExecCommand(
        command=request.command,
        cwd=request.cwd,
        env=dict(request.env),
        timeout_seconds=timeout,
        stdin=request.stdin,
        user=request.user,
        background=request.background,
    )


class ProcessService:
    def __init__(self, service: SandboxService):
        self.service = service

    async def _target(self, caller: Caller, sandbox_id: str) -> tuple[str, WorkerAPI]:
        sandbox = await self.service.get_running(caller, sandbox_id)
        self.service.activity.touch(sandbox.id)
        return sandbox.id, self.service._worker(sandbox.worker_id)

    @staticmethod
    def _check_pid(process_id: str) -> None:
        if not PROCESS_ID_RE.match(process_id):
            raise NotFound(f"process_id: no process {process_id[:64]!r}", code="process_not_found", field="process_id")

    async def _touching(self, sandbox_id: str, events) -> AsyncIterator[dict]:
        """Yields the worker's events, counting each as activity; always closes the stream
        (shielded: a client that went away cancels us, and the close is what tells the
        guest agent to kill a foreground command)."""
        try:
            async for event in events:
                self.service.activity.touch(sandbox_id)
                yield event
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()

    # --- exec -----------------------------------------------------------------------

    async def exec_stream(self, caller: Caller, sandbox_id: str, request: ExecRequest) -> AsyncIterator[dict]:
        """Starts the command (errors raise here) and returns its event stream."""
        vm_id, worker = await self._target(caller, sandbox_id)
        events = await worker.exec_stream(vm_id, exec_command(request))
        return self._touching(vm_id, events)

    async def exec_background(self, caller: Caller, sandbox_id: str, request: ExecRequest) -> dict:
        vm_id, worker = await self._target(caller, sandbox_id)
        command = exec_command(request)
        body: dict = {"command": command.command, "background": True, "env": command.env}
        for name in ("cwd", "timeout_seconds", "stdin", "user"):
            if getattr(command, name) is not None:
                body[name] = getattr(command, name)
        return await worker.process_call(vm_id, "POST", "/exec", body=body)

    # --- the process table ------------------------------------------------------------

    async def list(self, caller: Caller, sandbox_id: str) -> dict:
        vm_id, worker = await self._target(caller, sandbox_id)
        return await worker.process_call(vm_id, "GET", "/procs")

    async def get(self, caller: Caller, sandbox_id: str, process_id: str) -> dict:
        self._check_pid(process_id)
        vm_id, worker = await self._target(caller, sandbox_id)
        return await worker.process_call(vm_id, "GET", "/procs/get", params={"id": process_id})

    async def output(self, caller: Caller, sandbox_id: str, process_id: str, since_offset: int) -> dict:
        self._check_pid(process_id)
        vm_id, worker = await self._target(caller, sandbox_id)
        params = {"id": process_id, "since_offset": since_offset}
        return await worker.process_call(vm_id, "GET", "/procs/output", params=params)

    async def follow(self, caller: Caller, sandbox_id: str, process_id: str, since_offset: int) -> AsyncIterator[dict]:
        self._check_pid(process_id)
        vm_id, worker = await self._target(caller, sandbox_id)
        params = {"id": process_id, "since_offset": since_offset, "follow": "1"}
        return self._touching(vm_id, await worker.process_stream(vm_id, "/procs/output", params))

    async def stdin(self, caller: Caller, sandbox_id: str, process_id: str, data: bytes, eof: bool) -> dict:
        self._check_pid(process_id)
        vm_id, worker = await self._target(caller, sandbox_id)
        params = {"id": process_id, "eof": "1" if eof else "0"}
        return await worker.process_call(vm_id, "POST", "/procs/stdin", params=params, content=data, timeout=30.0)

    async def signal(self, caller: Caller, sandbox_id: str, process_id: str, signal: str) -> dict:
        self._check_pid(process_id)
        name = signal_name(signal)
        vm_id, worker = await self._target(caller, sandbox_id)
        return await worker.process_call(vm_id, "POST", "/procs/signal", body={"id": process_id, "signal": name})

    async def wait(self, caller: Caller, sandbox_id: str, process_id: str, timeout_seconds: float) -> dict:
        self._check_pid(process_id)
        vm_id, worker = await self._target(caller, sandbox_id)
        try:
            return await worker.process_call(
                vm_id, "POST", "/procs/wait", params={"id": process_id, "timeout": timeout_seconds},
                timeout=timeout_seconds + WAIT_MARGIN_SECONDS,
            )
        finally:
            self.service.activity.touch(vm_id)

    # --- PTY ------------------------------------------------------------------------

    async def open_pty(
        self, caller: Caller, sandbox_id: str, *, cols: int, rows: int, command: str | None,
        user: str | None, cwd: str | None,
    ) -> tuple[str, PtySession]:
        vm_id, worker = await self._target(caller, sandbox_id)
        params = {"cols": cols, "rows": rows, "command": command, "user": user, "cwd": cwd}
        return vm_id, await worker.open_pty(vm_id, params)
