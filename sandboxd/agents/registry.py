"""Agent kinds by name: the one place the control plane and the worker look them up.

Each kind lives in its own module (imported lazily, so a kind whose module is missing
or broken makes only that agent unavailable), exposing an AgentKind object.
"""

from __future__ import annotations

import importlib
import logging

from sandboxd.agents.base import AgentKind
from sandboxd.errors import NotImplementedYet

log = logging.getLogger(__name__)

# name -> (module, attribute)
KINDS: dict[str, tuple[str, str]] = {
    "deictic": ("sandboxd.agents.deictic_kind", "DEICTIC"),
    "claude-code": ("sandboxd.agents.claude_code", "CLAUDE_CODE"),
    "codex": ("sandboxd.agents.codex", "CODEX"),
}

# Which provider's endpoint a kind calls (for the operator's base-URL overrides).
PROVIDER_ANTHROPIC = "anthropic"
PROVIDER_OPENAI = "openai"


def names() -> list[str]:
    return list(KINDS)


def get(name: str) -> AgentKind:
    """The kind called ``name``; NotImplementedYet (501) if unknown or not installed here."""
    where = KINDS.get(name)
    if where is None:
        raise NotImplementedYet(
            f"agent: unknown agent {name[:64]!r} (one of {', '.join(KINDS)})", code="unknown_agent", field="agent"
        )
    module_name, attribute = where
    try:
        kind = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        log.warning("agent kind %s is not available: %s", name, exc)
        raise NotImplementedYet(
            f"agent: {name!r} is not available on this server", code="agent_not_available", field="agent"
        ) from None
    return kind


def provider(kind: AgentKind, model: str | None) -> str:
    """The provider ``kind`` calls for ``model``: the kind's own ``provider`` attribute (or
    ``provider_for(model)``) when it has one, else by model name (claude* is Anthropic)."""
    provider_for = getattr(kind, "provider_for", None)
    if callable(provider_for):
        return provider_for(model)
    fixed = getattr(kind, "provider", None)
    if isinstance(fixed, str):
        return fixed
    if kind.name == "claude-code" or (model or "").startswith("claude"):
        return PROVIDER_ANTHROPIC
    return PROVIDER_OPENAI
