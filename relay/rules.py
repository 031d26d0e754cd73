"""Which keys, window and action apply to a message: windows by kind of mail.

An OTP is a repeat within minutes, an invoice within months; the first rule
whose every condition matches decides, and unmatched mail gets the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from relay import headers
from relay.config import Config, DuplicateAction, KeySpec, RuleConfig, Scope

__all__ = ["Policy", "any_glob", "matches", "select"]


@dataclass(frozen=True)
class Policy:
    rule: str | None
    bypass: bool
    keys: tuple[KeySpec, ...]
    window: float | None
    scope: Scope
    on_duplicate: DuplicateAction


def any_glob(patterns: tuple[str, ...], values: list[str]) -> bool:
    """Some value matches some glob, ignoring case (routes match the same way)."""
    return any(fnmatchcase(v.lower(), p.lower()) for p in patterns for v in values)


def matches(
    rule: RuleConfig,
    found: list[headers.Field],
    sender: str,
    rcpts: tuple[str, ...],
    user: str | None,
) -> bool:
    m = rule.match
    for name, patterns in m.headers:
        if not any_glob(patterns, [headers.decoded(v) for v in headers.get_all(found, name)]):
            return False
    if m.sender and not any_glob(m.sender, [sender]):
        return False
    if m.recipient and not any_glob(m.recipient, list(rcpts)):
        return False
    return not (m.user and not any_glob(m.user, [user or ""]))


def select(
    config: Config,
    found: list[headers.Field],
    sender: str,
    rcpts: tuple[str, ...],
    user: str | None,
) -> Policy:
    dedupe = config.dedupe
    for rule in config.rules:
        if matches(rule, found, sender, rcpts, user):
            return Policy(
                rule=rule.name,
                bypass=rule.bypass or dedupe.mode == "off",
                keys=rule.keys or dedupe.keys,
                window=rule.window,
                scope=rule.scope or dedupe.scope,
                on_duplicate=rule.on_duplicate or dedupe.on_duplicate,
            )
    return Policy(
        rule=None,
        bypass=dedupe.mode == "off",
        keys=dedupe.keys,
        window=None,
        scope=dedupe.scope,
        on_duplicate=dedupe.on_duplicate,
    )
