"""The AgentKind of OpenAI Codex (npm ``@openai/codex``, pinned in ``clis.py``).

Models: ``gpt`` followed by anything (``gpt-5``, ``gpt-4.1-mini``, ``gpt-oss-120b``) or ``o``
followed by a digit (``o3``, ``o4-mini``), as the hosted service documents; at most 128
characters of ``[A-Za-z0-9._:-]``. The CLI does not check names itself. Without a model the
CLI uses its own default.

One-shot run (argv, no shell; ``sh`` only redirects stdin)::

    /bin/sh -c 'exec "$0" "$@" </dev/null' /opt/sandboxd/clis/bin/codex exec
        --skip-git-repo-check --ephemeral --json [-m M] --dangerously-bypass-approvals-and-sandbox
        -c 'model_providers.sandboxd={name="sandboxd",base_url="<URL>",env_key="SANDBOXD_LLM_KEY",
            wire_api="responses",request_max_retries=1,stream_max_retries=1}'
        -c model_provider=sandboxd -c features.plugins=false -c analytics.enabled=false -- TASK

codex exec reads stdin when it is not a terminal ("Reading additional input from stdin...")
and appends it to the prompt, so an open stdin pipe would hang it: the redirect makes that
impossible whatever the caller does with stdin. ``features.plugins=false`` stops the
start-up sync of the curated plugin catalogue (github.com, api.github.com) and
``analytics.enabled=false`` the A/B and analytics calls (chatgpt.com): with both, strace shows
codex connecting to the model endpoint only. The endpoint goes through a custom model
provider (``OPENAI_BASE_URL`` is not honoured); its key comes from ``SANDBOXD_LLM_KEY`` (a name
reserved to the platform, so a user's env_vars cannot collide) and is sent as
``Authorization: Bearer``. The retry limits make a 401 fail in well under a second. ``--``
keeps a task starting with ``-`` the prompt. Environment: ``SANDBOXD_LLM_KEY`` and ``HOME=/root``
(the worker sets ``PATH``). stdout is JSONL: ``thread.started``, ``turn.started``,
``item.started``/``item.completed`` (``command_execution``, ``file_change``, ``agent_message``,
``error``), ``turn.completed`` with usage, or ``turn.failed``; exit status 1 on failure.
Because the provider is not OpenAI's own, codex prints a harmless "Model metadata for `M` not
found" item and uses fallback model metadata (no apply_patch tool: it edits through shell).

Ready files (agent without a task, for exec use): ``/root/.codex/config.toml`` selecting the
same provider, with the key as the provider's ``experimental_bearer_token`` (so ``codex exec``
works with no env var) and, when given, the default model. It holds the key: write it 0600.
"""

from __future__ import annotations

import json
import re

from sandboxd.agents.base import GUEST_CLI_DIR, AgentRun, check_model_name

CODEX_BIN = GUEST_CLI_DIR + "/bin/codex"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
CONFIG_PATH = "/root/.codex/config.toml"
KEY_ENV = "SANDBOXD_LLM_KEY"
PROVIDER_ID = "sandboxd"
_MODEL = re.compile(r"(gpt[A-Za-z0-9._:-]{0,125}|o[0-9][A-Za-z0-9._:-]{0,126})")


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML escapes)."""
    return json.dumps(value, ensure_ascii=False)


class CodexKind:
    name = "codex"
    needs_cli_layer = True
    unsupported_runtimes = {  # README: Runtimes
        "gvisor": "under Debian's 2022 gVisor codex never reaps its tools' shells and its turn never ends",
    }
    provider = "openai"
    default_base_url = DEFAULT_BASE_URL

    def check_model(self, model: str | None) -> None:
        if model is not None:  # None: the CLI's default model
            check_model_name(self.name, _MODEL, "start with 'gpt', or 'o' followed by a digit", model)

    def provider_config(self, base_url: str | None) -> str:
        """The ``-c`` value defining the provider (no secret in it: only the env var's name)."""
        url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        return (
            f"model_providers.{PROVIDER_ID}={{name={_toml_str(PROVIDER_ID)},base_url={_toml_str(url)},"
            f'env_key="{KEY_ENV}",wire_api="responses",request_max_retries=1,stream_max_retries=1}}'
        )

    def run(self, *, model: str | None, task: str, llm_key: str, base_url: str | None) -> AgentRun:
        self.check_model(model)
        argv = ["/bin/sh", "-c", 'exec "$0" "$@" </dev/null', CODEX_BIN, "exec",
                "--skip-git-repo-check", "--ephemeral", "--json"]
        if model:
            argv += ["-m", model]
        argv += ["--dangerously-bypass-approvals-and-sandbox",
                 "-c", self.provider_config(base_url), "-c", f"model_provider={PROVIDER_ID}",
                 "-c", "features.plugins=false", "-c", "analytics.enabled=false", "--", task]
        return AgentRun(argv=argv, env={KEY_ENV: llm_key, "HOME": "/root"})

    def ready_files(self, *, model: str | None, llm_key: str, base_url: str | None) -> dict[str, str]:
        self.check_model(model)
        url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        lines = []
        if model:
            lines.append(f"model = {_toml_str(model)}")
        lines += [
            f"model_provider = {_toml_str(PROVIDER_ID)}",
            'approval_policy = "never"',
            'sandbox_mode = "danger-full-access"',
            "",
            f"[model_providers.{PROVIDER_ID}]",
            f"name = {_toml_str(PROVIDER_ID)}",
            f"base_url = {_toml_str(url)}",
            f"experimental_bearer_token = {_toml_str(llm_key)}",
            'wire_api = "responses"',
            "request_max_retries = 1",
            "stream_max_retries = 1",
            "",
            "[features]",
            "plugins = false",
            "",
            "[analytics]",
            "enabled = false",
        ]
        return {CONFIG_PATH: "\n".join(lines) + "\n"}


CODEX = CodexKind()
