"""The SQLite store's statements, each named for what it does, with named parameters.

Rows come back as `sqlite3.Row` and are read by column name. Statements over a
variable number of values (the claim, `IN` lists) are built by the functions
below, still with named parameters. A PostgreSQL backend keeps its own module
like this one; the decisions around the SQL live in `relay.decision` and
`relay.store.changes`, shared by both.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from relay.audit import FIELDS

__all__ = [
    "CLAIMS_OF_OTHERS",
    "DELETE_BODY",
    "DELETE_CLAIMS_OF_MESSAGE",
    "DELETE_EXPIRED_CLAIMS",
    "DELETE_KEPT_BODIES",
    "DELETE_MESSAGE_ROWS",
    "DELETE_OLD_EVENTS",
    "DELETE_RECIPIENT_CLAIM",
    "END_LEASE",
    "EXPIRED_LEASES",
    "FINISHED_MESSAGES",
    "HAS_META",
    "HEARTBEAT_INSTANCE",
    "INSERT_BODY",
    "INSERT_EVENT",
    "INSERT_MESSAGE",
    "INSERT_RECIPIENT",
    "LEASE_DUE",
    "MESSAGE_FOR_EVENTS",
    "NEXT_DUE",
    "READY_PROBE",
    "RECIPIENTS_IN_STATE",
    "RECIPIENT_STATES",
    "RELEASE_INSTANCE",
    "RESERVE_SEND",
    "SCHEMA_VERSION",
    "SELECT_BODY",
    "SELECT_INSTANCE",
    "SETTLE_CLAIM",
    "SET_SCHEMA_VERSION",
    "STUCK_LEASES",
    "TAKE_INSTANCE",
    "UNLEASE",
    "UPDATE_RECIPIENT",
    "bodies_of",
    "claim",
    "in_list",
    "in_params",
    "queued_recipients_of",
    "renew_leases",
]

# Generated from the Event fields, in their order: the one statement bound by position
# (`changes.event_row`), as it runs for every event and cannot drift from its columns.
INSERT_EVENT = f"INSERT INTO events ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"

# --- accept ------------------------------------------------------------------

_CLAIM_ROW = "(:scope, :key, :rcpt{n}, :queue_id, :fingerprint, :now, :expires_at, 1)"


@functools.lru_cache(maxsize=64)
def claim(recipients: int) -> str:
    """One upsert for every recipient: an expired, settled claim is taken over in place.

    The unique index decides who owns each (scope, key, rcpt); RETURNING lists the
    recipients this submission now owns. Parameters: scope, key, rcpt0..rcptN-1,
    queue_id, fingerprint, now, expires_at.
    """
    rows = ", ".join(_CLAIM_ROW.format(n=n) for n in range(recipients))
    return (
        "INSERT INTO claims (scope, key, rcpt, queue_id, fingerprint, claimed_at, expires_at,"
        f" pending) VALUES {rows}"
        " ON CONFLICT (scope, key, rcpt) DO UPDATE SET queue_id = excluded.queue_id,"
        " fingerprint = excluded.fingerprint, claimed_at = excluded.claimed_at,"
        " expires_at = excluded.expires_at, pending = 1"
        " WHERE claims.expires_at <= :now AND claims.pending = 0"
        " RETURNING rcpt"
    )


CLAIMS_OF_OTHERS = (
    "SELECT rcpt, queue_id, fingerprint FROM claims"
    " WHERE scope = :scope AND key = :key AND queue_id <> :queue_id"
    " AND (expires_at > :now OR pending = 1) ORDER BY claimed_at"
)
# Claims are found by their key (the table is clustered on it), never by queue_id alone.
DELETE_CLAIMS_OF_MESSAGE = (
    "DELETE FROM claims WHERE scope = :scope AND key = :key AND queue_id = :queue_id"
)
INSERT_MESSAGE = (
    "INSERT INTO messages (queue_id, received_at, state, sender, size, message_id, scope, key,"
    " strategy, fingerprint, rule, client, user, helo, smtputf8, body8bit, duplicate_of,"
    " next_attempt) VALUES (:queue_id, :received_at, 'queued', :sender, :size, :message_id,"
    " :scope, :key, :strategy, :fingerprint, :rule, :client, :user, :helo, :smtputf8,"
    " :body8bit, :duplicate_of, :received_at)"
)
INSERT_BODY = "INSERT INTO bodies (queue_id, data) VALUES (:queue_id, :data)"
INSERT_RECIPIENT = (
    "INSERT INTO recipients (queue_id, rcpt, state, updated_at)"
    " VALUES (:queue_id, :rcpt, 'queued', :updated_at)"
)

# --- lease -------------------------------------------------------------------

LEASE_DUE = (
    "UPDATE messages SET state = 'sending', lease_owner = :owner, lease_until = :until,"
    " attempts = attempts + 1 WHERE queue_id IN (SELECT queue_id FROM messages"
    " WHERE state = 'queued' AND next_attempt <= :now ORDER BY next_attempt LIMIT :limit)"
    " RETURNING queue_id, sender, received_at, attempts, message_id, key, strategy, scope,"
    " size, smtputf8, body8bit, duplicate_of, rule, user"
)
NEXT_DUE = "SELECT min(next_attempt) AS next_due FROM messages WHERE state = 'queued'"
SELECT_BODY = "SELECT data FROM bodies WHERE queue_id = :queue_id"


@functools.lru_cache(maxsize=256)
def in_list(column: str, count: int, prefix: str = "id") -> str:
    """`column IN (:id0, :id1, ...)` for `count` values."""
    return f"{column} IN ({', '.join(f':{prefix}{n}' for n in range(count))})"


def in_params(values: Sequence[Any], prefix: str = "id") -> dict[str, Any]:
    return {f"{prefix}{n}": value for n, value in enumerate(values)}


def queued_recipients_of(count: int) -> str:
    return "SELECT queue_id, rcpt FROM recipients WHERE state = 'queued' AND " + in_list(
        "queue_id", count
    )


def bodies_of(count: int) -> str:
    return "SELECT queue_id, data FROM bodies WHERE " + in_list("queue_id", count)


UNLEASE = (
    "UPDATE messages SET state = 'queued', next_attempt = :next_attempt, lease_owner = NULL,"
    " lease_until = NULL, attempts = max(attempts - 1, 0)"
    " WHERE queue_id = :queue_id AND state = 'sending' AND lease_owner = :owner"
)
STUCK_LEASES = (
    "SELECT queue_id, lease_owner FROM messages WHERE state = 'sending'"
    " AND (lease_owner = :owner OR lease_until < :now)"
)
EXPIRED_LEASES = (
    "SELECT queue_id, lease_owner FROM messages WHERE state = 'sending'"
    " AND lease_until < :now AND lease_owner IS NOT :owner"
)


def renew_leases(count: int) -> str:
    """Parameters: owner, until, id0..idN-1. Only leases `owner` still holds are extended."""
    return (
        "UPDATE messages SET lease_until = :until"
        " WHERE state = 'sending' AND lease_owner = :owner AND "
        + in_list("queue_id", count)
        + " RETURNING queue_id"
    )


# --- instances -----------------------------------------------------------------

SELECT_INSTANCE = (
    "SELECT name, host, pid, token, started, since, heartbeat FROM instances WHERE name = :name"
)
TAKE_INSTANCE = (
    "INSERT INTO instances (name, host, pid, token, started, since, heartbeat)"
    " VALUES (:name, :host, :pid, :token, :started, :since, :heartbeat)"
    " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
    " token = excluded.token, started = excluded.started, since = excluded.since,"
    " heartbeat = excluded.heartbeat"
)
HEARTBEAT_INSTANCE = "UPDATE instances SET heartbeat = :now WHERE name = :name AND token = :token"
RELEASE_INSTANCE = "DELETE FROM instances WHERE name = :name AND token = :token"

# --- update ------------------------------------------------------------------

MESSAGE_FOR_EVENTS = (
    "SELECT key, strategy, message_id, sender, size, client, user, scope, state, lease_owner"
    " FROM messages WHERE queue_id = :queue_id"
)
UPDATE_RECIPIENT = (
    "UPDATE recipients SET state = :state, code = :code, reply = :reply,"
    " upstream_id = :upstream_id, updated_at = :ts WHERE queue_id = :queue_id AND rcpt = :rcpt"
)
_OWN_CLAIM = "scope = :scope AND key = :key AND rcpt = :rcpt AND queue_id = :queue_id"
SETTLE_CLAIM = f"UPDATE claims SET pending = 0 WHERE {_OWN_CLAIM}"
DELETE_RECIPIENT_CLAIM = f"DELETE FROM claims WHERE {_OWN_CLAIM}"
RECIPIENT_STATES = "SELECT DISTINCT state FROM recipients WHERE queue_id = :queue_id"
END_LEASE = (
    "UPDATE messages SET state = :state, next_attempt = :next_attempt, lease_owner = NULL,"
    " lease_until = NULL, finished_at = :finished_at WHERE queue_id = :queue_id"
)
DELETE_BODY = "DELETE FROM bodies WHERE queue_id = :queue_id"
RECIPIENTS_IN_STATE = "SELECT rcpt FROM recipients WHERE queue_id = :queue_id AND state = :state"

# The later of now and one interval after the last booking, booked and returned at once.
RESERVE_SEND = (
    "INSERT INTO pacing (upstream, last_at) VALUES (:upstream, :now)"
    " ON CONFLICT (upstream) DO UPDATE SET last_at = max(last_at + :interval, :now)"
    " RETURNING last_at"
)

HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
SCHEMA_VERSION = "SELECT value FROM meta WHERE name = 'schema'"
SET_SCHEMA_VERSION = (
    "INSERT INTO meta (name, value) VALUES ('schema', :version)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

READY_PROBE = (
    "INSERT INTO meta (name, value) VALUES ('ready-probe', :now)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

# --- purge -------------------------------------------------------------------

DELETE_EXPIRED_CLAIMS = (
    "DELETE FROM claims WHERE (scope, key, rcpt) IN (SELECT scope, key, rcpt FROM claims"
    " WHERE expires_at <= :cutoff AND pending = 0 LIMIT :chunk)"
)
DELETE_KEPT_BODIES = (
    "DELETE FROM bodies WHERE queue_id IN (SELECT queue_id FROM messages"
    " WHERE state = 'done' AND finished_at <= :cutoff LIMIT :chunk)"
)
DELETE_OLD_EVENTS = (
    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE ts < :cutoff LIMIT :chunk)"
)
FINISHED_MESSAGES = (
    "SELECT queue_id FROM messages WHERE state = 'done' AND finished_at < :cutoff LIMIT :chunk"
)
DELETE_MESSAGE_ROWS = tuple(
    f"DELETE FROM {table} WHERE queue_id = :queue_id"
    for table in ("recipients", "bodies", "messages")
)
