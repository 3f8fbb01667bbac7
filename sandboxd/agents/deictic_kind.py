"""The AgentKind of deictic, sandboxd's own coding agent (the program is `deictic.py` beside this).

deictic needs nothing installed: the template's python3 runs it from the read-only mount of
this directory. `claude*` models speak the Anthropic Messages API, `gpt*` / `o<digit>*` the
OpenAI Responses API; the model is required.
"""

from __future__ import annotations

import json
import re

from sandboxd.agents.base import GUEST_AGENTS_DIR, AgentRun, check_model_name
from sandboxd.errors import BadRequest

SCRIPT = GUEST_AGENTS_DIR + "/deictic.py"
PYTHON = "/usr/bin/python3"
CONFIG_PATH = "/root/.config/deictic/config.json"  # read by deictic.py when DEICTIC_API_KEY is unset
_MODEL = re.compile(r"(claude|gpt|o[0-9])[A-Za-z0-9._:@/-]{0,124}")


class DeicticKind:
    name = "deictic"
    needs_cli_layer = False
    unsupported_runtimes: dict[str, str] = {}

    def check_model(self, model: str | None) -> None:
        if not model:
            raise BadRequest("model: required for the deictic agent", code="missing_field", field="model")
        check_model_name(self.name, _MODEL, "start with claude, gpt, or o followed by a digit", model)

    def provider_for(self, model: str | None) -> str:
        """Which provider's endpoint (and operator base URL) the model calls."""
        return "anthropic" if (model or "").startswith("claude") else "openai"

    def run(self, *, model: str | None, task: str, llm_key: str, base_url: str | None) -> AgentRun:
        self.check_model(model)
        env = {"DEICTIC_API_KEY": llm_key}
        if base_url:
            env["DEICTIC_BASE_URL"] = base_url
        argv = [PYTHON, "-s", "-B", SCRIPT, "--model", model, "--task", task]
        return AgentRun(argv=argv, env=env)

    def ready_files(self, *, model: str | None, llm_key: str, base_url: str | None) -> dict[str, str]:
        config = {"api_key": llm_key}
        if base_url:
            config["base_url"] = base_url
        if model:
            config["model"] = model  # the default when --model is not given
        return {CONFIG_PATH: json.dumps(config, indent=2) + "\n"}


DEICTIC = DeicticKind()
