"""One-shot coding agents: what the worker needs to start one inside a sandbox.

Each agent kind (claude-code, codex, deictic) is a module in this package exposing an
`AgentKind`. The worker asks it for the command line and environment, starts that as a
background process through the guest agent (its output goes to the sandbox logs with
source "agent"), and reports its exit as agent_status / agent_exit_code.

The llm_key only ever travels in AgentRun.env, which is given to the agent process alone:
never to exec'd commands, never to a file on the host, never to the store or the logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandboxd.errors import BadRequest

# Where agent code and CLIs appear inside a sandbox (read-only mounts).
GUEST_AGENTS_DIR = "/opt/sandboxd/agents"  # this package's directory: deictic runs from here
GUEST_CLI_DIR = "/opt/sandboxd/clis"  # the npm-installed agent CLIs (only when an agent needs them)


@dataclass(frozen=True)
class AgentRun:
    argv: list[str]  # run inside the sandbox (no shell)
    env: dict[str, str] = field(default_factory=dict)  # extra env for the agent process only
    cwd: str = "/workspace"


@dataclass(frozen=True)
class CliLayer:
    """A read-only directory of installed agent CLIs, mounted at GUEST_CLI_DIR."""

    host_dir: Path
    bin_dir: str  # inside the sandbox, to prepend to PATH (e.g. /opt/sandboxd/clis/bin)


class AgentKind(Protocol):
    name: str  # "claude-code" | "codex" | "deictic"
    needs_cli_layer: bool
    # runtimes this agent cannot work on, with the reason (a create there is 400 agent_unsupported)
    unsupported_runtimes: dict[str, str]

    def check_model(self, model: str | None) -> None:
        """Raise sandboxd.errors.BadRequest(field="model", code="invalid_model" | "missing_field")."""

    def run(self, *, model: str | None, task: str, llm_key: str, base_url: str | None) -> AgentRun:
        """The one-shot run of `task`."""

    def ready_files(self, *, model: str | None, llm_key: str, base_url: str | None) -> dict[str, str]:
        """Without a task: files (path inside the sandbox → content) that leave the CLI
        configured with the key for use through exec (e.g. the CLI's own config file)."""


def check_model_name(agent: str, pattern: re.Pattern, expectation: str, model: str | None) -> None:
    """400 invalid_model (field model) unless the model matches the agent's naming rule."""
    if not isinstance(model, str) or not pattern.fullmatch(model):
        raise BadRequest(
            f"model: {agent} models {expectation} (got {str(model)[:64]!r})", code="invalid_model", field="model"
        )
