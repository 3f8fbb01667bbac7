"""Identifiers. Sandbox IDs are fixed-width (`sbx_` + 8 of [a-z0-9]) because runsc matches
container IDs by prefix, and because they name netns, cgroups and veths on the host."""

from __future__ import annotations

import hashlib
import re
import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits
SANDBOX_ID_RE = re.compile(r"^sbx_[a-z0-9]{8}$")
API_KEY_PREFIX = "sbd_"
WORKER_TOKEN_PREFIX = "swt_"


def _random_suffix(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_sandbox_id() -> str:
    return "sbx_" + _random_suffix(8)


def new_user_id() -> str:
    return "usr_" + _random_suffix(10)


def new_key_id() -> str:
    return "key_" + _random_suffix(10)


def new_worker_id() -> str:
    return "wrk_" + _random_suffix(8)


def new_worker_token_id() -> str:
    return "wtk_" + _random_suffix(10)


def new_worker_token() -> str:
    return WORKER_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def is_sandbox_id(value: str) -> bool:
    return bool(SANDBOX_ID_RE.match(value))
