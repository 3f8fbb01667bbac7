"""The AgentKind of Claude Code (npm ``@anthropic-ai/claude-code``, pinned in ``clis.py``).

Models: the name must start with ``claude`` (``claude-sonnet-4-5``, ``claude-opus-4-1-20250805``,
...), as the hosted service documents. The CLI's own aliases (``sonnet``, ``opus``, ``haiku``,
``opusplan``) are refused (400 invalid_model): a client written for the hosted API never sends
them, and accepting them would make the same request mean different models on different
servers. The CLI does not check names itself, so this check is the only one. Without a model
the CLI uses its own default. Names are limited to 128 characters of ``[A-Za-z0-9._:@/-]``.

One-shot run (argv, no shell)::

    /opt/sandboxd/clis/bin/claude -p --output-format stream-json --verbose
        [--model M] --dangerously-skip-permissions -- TASK

``--`` ends the options, so a task starting with ``-`` stays the prompt. Environment:
``ANTHROPIC_API_KEY`` (the llm_key), ``ANTHROPIC_BASE_URL`` (only when a base URL is given;
the CLI appends ``/v1/messages``), ``IS_SANDBOX=1`` (as root the CLI refuses
``--dangerously-skip-permissions`` without it), ``CLAUDE_CODE_MAX_RETRIES=1`` (a 401 fails in
about a second instead of retrying with back-off), ``DISABLE_TELEMETRY=1``,
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` (no /api/hello, update checks, error reporting),
``DISABLE_AUTOUPDATER=1`` and ``HOME=/root`` (the worker sets ``PATH``, the CLI layer's
``bin`` first; the argv names the binary by absolute path anyway). stdout is
one JSON object per line (``system`` init, ``assistant``/``user`` messages with tool_use /
tool_result blocks, a final ``result`` with ``is_error``); the exit status is 0 on success,
1 on a provider error (e.g. ``api_error_status: 401``).

Ready files (agent without a task, for use through exec): ``/root/.claude/settings.json``
whose ``env`` block carries the same variables (the CLI applies it at start, so a bare
``claude -p "..." --dangerously-skip-permissions`` works without any env var), plus
``/root/.claude.json`` marking onboarding done and the key approved so an interactive
``claude`` in a PTY does not stop at the first-run screens. Both hold the key: write them 0600.
"""

from __future__ import annotations

import json
import re

from sandboxd.agents.base import GUEST_CLI_DIR, AgentRun, check_model_name

CLAUDE = GUEST_CLI_DIR + "/bin/claude"
DEFAULT_BASE_URL = "https://api.anthropic.com"
SETTINGS_PATH = "/root/.claude/settings.json"
STATE_PATH = "/root/.claude.json"
_MODEL = re.compile(r"claude[A-Za-z0-9._:@/-]{0,122}")


class ClaudeCodeKind:
    name = "claude-code"
    needs_cli_layer = True
    unsupported_runtimes: dict[str, str] = {}
    provider = "anthropic"
    default_base_url = DEFAULT_BASE_URL

    def check_model(self, model: str | None) -> None:
        if model is not None:  # None: the CLI's default model
            check_model_name(self.name, _MODEL, "start with 'claude'", model)

    def _env(self, llm_key: str, base_url: str | None) -> dict[str, str]:
        env = {
            "ANTHROPIC_API_KEY": llm_key,
            "IS_SANDBOX": "1",
            "CLAUDE_CODE_MAX_RETRIES": "1",
            "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
        }
        if base_url:
            env["ANTHROPIC_BASE_URL"] = base_url.rstrip("/")
        return env

    def run(self, *, model: str | None, task: str, llm_key: str, base_url: str | None) -> AgentRun:
        self.check_model(model)
        argv = [CLAUDE, "-p", "--output-format", "stream-json", "--verbose"]
        if model:
            argv += ["--model", model]
        argv += ["--dangerously-skip-permissions", "--", task]
        env = {**self._env(llm_key, base_url), "HOME": "/root"}
        return AgentRun(argv=argv, env=env)

    def ready_files(self, *, model: str | None, llm_key: str, base_url: str | None) -> dict[str, str]:
        self.check_model(model)
        settings: dict = {"env": self._env(llm_key, base_url)}
        if model:
            settings["model"] = model
        state = {
            "hasCompletedOnboarding": True,
            "bypassPermissionsModeAccepted": True,
            "customApiKeyResponses": {"approved": [llm_key[-20:]], "rejected": []},
        }
        return {
            SETTINGS_PATH: json.dumps(settings, indent=2) + "\n",
            STATE_PATH: json.dumps(state, indent=2) + "\n",
        }


CLAUDE_CODE = ClaudeCodeKind()
