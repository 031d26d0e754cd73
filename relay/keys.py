"""Dedupe keys: which value says "this is the same email" for a given message.

Strategies are tried in the configured order and the first that yields a key
wins; the audit records which one it was, so an operator can see why two
messages were treated as one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from relay import headers
from relay.config import DedupeConfig, KeySpec, Scope
from relay.errors import BadKey

__all__ = [
    "MAX_KEY_LENGTH",
    "BadKey",
    "Key",
    "derive",
    "derived_message_id",
    "header_key",
    "message_id_key",
    "normalise_message_id",
    "scope_value",
]

MAX_KEY_LENGTH = 255
_PRINTABLE = re.compile(r"^[\x20-\x7e]+$")
_ANGLE = re.compile(r"<([^<>]*)>")


@dataclass(frozen=True)
class Key:
    strategy: str
    value: str
    window: float


def header_key(found: list[headers.Field], name: str) -> str | None:
    values = headers.get_all(found, name)
    if not values:
        return None
    keys = {v.strip() for v in values}
    if len(keys) > 1:
        raise BadKey(f"{name} header appears more than once with different values")
    key = keys.pop()
    if not key:
        raise BadKey(f"{name} header is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise BadKey(f"{name} header is longer than {MAX_KEY_LENGTH} characters")
    if not _PRINTABLE.match(key):
        raise BadKey(f"{name} header has characters outside printable ASCII")
    return key


def normalise_message_id(value: str) -> str | None:
    """`<abc@host>`, ` abc@host ` and `<abc@host> (comment)` are one Message-ID."""
    match = _ANGLE.search(value)
    text = (match.group(1) if match else value).strip()
    return text or None


def message_id_key(found: list[headers.Field]) -> str | None:
    value = headers.get(found, "Message-ID")
    return normalise_message_id(value) if value is not None else None


def derive(
    specs: tuple[KeySpec, ...],
    found: list[headers.Field],
    fingerprint: str,
    dedupe: DedupeConfig,
    rule_window: float | None = None,
) -> Key:
    """The first strategy that yields a value; fingerprint always does, so there is always a key."""
    for spec in specs:
        value: str | None
        if spec.strategy == "header":
            assert spec.header is not None
            value = header_key(found, spec.header)
        elif spec.strategy == "message-id":
            value = message_id_key(found)
        else:
            value = fingerprint
        if value is not None:
            return Key(spec.name, value, dedupe.window_for(spec, rule_window))
    return Key("fingerprint", fingerprint, dedupe.window_for(KeySpec("fingerprint"), rule_window))


def scope_value(scope: Scope, user: str | None, sender: str) -> str:
    """Keys are scoped so that two tenants can never suppress each other's mail."""
    if scope == "user":
        return f"user:{user or '-'}"
    if scope == "sender_domain":
        return f"domain:{headers.address_domain(sender) or '-'}"
    return "global"


def derived_message_id(scope: str, key: Key, domain: str) -> str:
    """The same logical email always carries the same Message-ID, so downstream dedupe works too."""
    digest = hashlib.sha256(f"{scope}\x1f{key.strategy}\x1f{key.value}".encode()).hexdigest()
    return f"<{digest[:32]}@{domain}>"
