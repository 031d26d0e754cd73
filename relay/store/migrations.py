"""Versioned schema migrations for both backends: an upgrade never needs a manual step.

Each backend has its own numbered steps; a store records the last one it applied
(the `schema` row of `meta`). `python -m relay migrate` and every start apply
the steps a store lacks, in one transaction, under a lock, so replicas started
together apply each step once. A store newer than the code is refused rather
than written with an old idea of its tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.errors import StoreError
from relay.store import pg_schema, schema

__all__ = ["POSTGRES", "SQLITE", "Migrated", "Migration", "pending"]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    script: str


@dataclass(frozen=True)
class Migrated:
    """What a migration run found and did."""

    before: int
    applied: tuple[Migration, ...]

    @property
    def after(self) -> int:
        return self.applied[-1].version if self.applied else self.before


SQLITE = (
    Migration(1, "queue, claims and audit trail", schema.TABLES),
    Migration(2, "review indexes and the recipient index", schema.REVIEW),
    Migration(3, "shared rate-limit bookings", schema.PACING),
    Migration(4, "instance names held by live processes", schema.INSTANCES),
    Migration(
        5, "claims clustered on their key, without the queue_id index", schema.CLUSTERED_CLAIMS
    ),
    Migration(6, "indexes kept only for the rows they find", schema.PARTIAL_INDEXES),
)
POSTGRES = (
    Migration(1, "queue, claims, audit trail and review indexes", pg_schema.TABLES),
    Migration(2, "shared rate-limit bookings", pg_schema.PACING),
    Migration(3, "instance names held by live processes", pg_schema.INSTANCES),
    Migration(4, "claims found by their key, without the queue_id index", pg_schema.CLAIMS_BY_KEY),
    Migration(5, "indexes kept only for the rows they find", pg_schema.PARTIAL_INDEXES),
)


def pending(steps: tuple[Migration, ...], current: int, where: str) -> tuple[Migration, ...]:
    """The steps a store at `current` lacks; a store ahead of this code is an error."""
    latest = steps[-1].version
    if current > latest:
        raise StoreError(
            f"the store {where} is at schema version {current}, newer than this relay knows"
            f" ({latest}): run the newer relay, or restore a backup taken before the upgrade"
        )
    return tuple(step for step in steps if step.version > current)
