"""Which upstreams a message goes to, in failover order: the first route that matches.

Routes are read when a message is delivered, not when it is accepted, so a changed
route applies to mail already queued, as Postfix's transport maps do. A message
matching no route goes to the first upstream alone, as Postfix's `relayhost`.
"""

from __future__ import annotations

from relay import headers
from relay.config import Config, RouteMatch
from relay.rules import any_glob

__all__ = ["matches", "select"]


def matches(
    match: RouteMatch,
    *,
    sender: str,
    found: list[headers.Field],
    rule: str | None,
    user: str | None,
) -> bool:
    """Every condition given holds: envelope sender, headers, the dedupe rule, the AUTH user."""
    if match.sender and not any_glob(match.sender, [sender]):
        return False
    for name, patterns in match.headers:
        if not any_glob(patterns, [headers.decoded(v) for v in headers.get_all(found, name)]):
            return False
    if match.rule and not any_glob(match.rule, [rule or ""]):
        return False
    return not (match.user and not any_glob(match.user, [user or ""]))


def select(
    config: Config, *, sender: str, data: bytes, rule: str | None, user: str | None
) -> tuple[str, ...]:
    """The names of the upstreams to try, first to last."""
    found: list[headers.Field] | None = None
    for route in config.routes:
        if route.match is None:
            return route.upstreams
        if route.match.headers and found is None:
            found = headers.fields(data)
        if matches(route.match, sender=sender, found=found or [], rule=rule, user=user):
            return route.upstreams
    return (config.delivery_upstreams[0].label,)
