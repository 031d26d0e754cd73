"""The PostgreSQL store's statements, each named for what it does, with named parameters.

They are written with `:name` parameters, like SQLite's, and compiled once to
PostgreSQL's `$1, $2, ...`; `Query.args` lays the values out in that order.
Lists travel as arrays (`unnest`, `= ANY`), so one statement covers every
recipient or event, and every round trip to the server counts: a job that
the SQLite store runs as five statements is one or two here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.audit import FIELDS

__all__ = [
    "CHANNEL",
    "CLAIM",
    "CLAIMS_OF_OTHERS",
    "DELETE_CLAIMS_OF_MESSAGE",
    "DELETE_EXPIRED_CLAIMS",
    "DELETE_KEPT_BODIES",
    "DELETE_OLD_EVENTS",
    "END_LEASE",
    "EXPIRED_LEASES",
    "HAS_META",
    "HEARTBEAT_INSTANCE",
    "INSERT_EVENTS",
    "LEASE",
    "LEASE_OF",
    "LOCK_INSTANCE",
    "MESSAGE_STATE",
    "MIGRATION_LOCK",
    "PURGE_MESSAGES",
    "READY_PROBE",
    "RECIPIENTS_IN_STATE",
    "RELEASE_INSTANCE",
    "RENEW_LEASES",
    "RESERVE_SEND",
    "SCHEMA_VERSION",
    "SELECT_BODY",
    "SELECT_INSTANCE",
    "SET_SCHEMA_VERSION",
    "SPOOL",
    "STUCK_LEASES",
    "TAKE_INSTANCE",
    "UNLEASE",
    "UNLEASE_LOST",
    "UPDATE_RECIPIENTS",
    "Query",
    "event_columns",
]

# NOTIFY on this channel says "work may be due": new mail, a lease given back, a requeue.
CHANNEL = "dedup_relay_work"
# pg_advisory_xact_lock key for migrations: replicas starting together migrate one at a time.
MIGRATION_LOCK = 0x6465_6475_7052_6C79  # "dedupRly"


@dataclass(frozen=True)
class Query:
    """A statement with `$n` parameters and the names they stand for, in order."""

    text: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def _q(text: str) -> Query:
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Query(re.sub(r"(?<![:\w]):([a-z_][a-z0-9_]*)", number, text), tuple(names))


# --- migrations ----------------------------------------------------------------

HAS_META = _q("SELECT to_regclass('meta') IS NOT NULL")
SCHEMA_VERSION = _q("SELECT value FROM meta WHERE name = 'schema'")
SET_SCHEMA_VERSION = _q(
    "INSERT INTO meta (name, value) VALUES ('schema', :version)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

# --- accept ------------------------------------------------------------------

# The unique index decides who owns each (scope, key, rcpt); RETURNING lists the recipients this
# submission now owns. Recipients arrive sorted, so replicas lock rows in one order.
CLAIM = _q(
    "INSERT INTO claims AS c (scope, key, rcpt, queue_id, fingerprint, claimed_at, expires_at,"
    " pending) SELECT :scope::text, :key::text, r, :queue_id::text, :fingerprint::text,"
    " :now::float8, :expires_at::float8, true FROM unnest(:rcpts::text[]) AS r"
    " ON CONFLICT (scope, key, rcpt) DO UPDATE SET queue_id = excluded.queue_id,"
    " fingerprint = excluded.fingerprint, claimed_at = excluded.claimed_at,"
    " expires_at = excluded.expires_at, pending = true"
    " WHERE c.expires_at <= :now::float8 AND NOT c.pending"
    " RETURNING rcpt"
)
# A statement of its own, after the claim: under READ COMMITTED it sees a claim that another
# replica committed while the claim waited for that row's lock.
CLAIMS_OF_OTHERS = _q(
    "SELECT rcpt, queue_id, fingerprint FROM claims"
    " WHERE scope = :scope AND key = :key AND queue_id <> :queue_id"
    " AND (expires_at > :now OR pending) ORDER BY claimed_at"
)
# Claims are found by their key (the primary key), never by queue_id alone: no index on it.
DELETE_CLAIMS_OF_MESSAGE = _q(
    "DELETE FROM claims WHERE scope = :scope AND key = :key AND queue_id = :queue_id"
)
SPOOL = _q(
    "WITH message AS (INSERT INTO messages (queue_id, received_at, state, sender, size,"
    ' message_id, scope, key, strategy, fingerprint, rule, client, "user", helo, smtputf8,'
    " body8bit, duplicate_of, next_attempt) VALUES (:queue_id, :received_at, 'queued',"
    " :sender, :size, :message_id, :scope, :key, :strategy, :fingerprint, :rule, :client,"
    " :user, :helo, :smtputf8, :body8bit, :duplicate_of, :received_at)),"
    " body AS (INSERT INTO bodies (queue_id, data) VALUES (:queue_id, :data))"
    " INSERT INTO recipients (queue_id, rcpt, state, updated_at)"
    " SELECT :queue_id::text, r, 'queued', :received_at::float8 FROM unnest(:rcpts::text[]) AS r"
)


def event_columns() -> tuple[tuple[str, str], ...]:
    """Each Event field with its array type, in the order of FIELDS."""
    types = {"ts": "float8", "duration": "float8", "size": "int8", "code": "int4"}
    return tuple((name, types.get(name, "text")) for name in FIELDS)


_EVENT_NAMES = ", ".join(f'"{name}"' for name, _ in event_columns())
_EVENT_ARRAYS = ", ".join(f":{name}::{kind}[]" for name, kind in event_columns())
# Every event of a batch in one statement (the recipient index's trigger then runs once).
INSERT_EVENTS = _q(f"INSERT INTO events ({_EVENT_NAMES}) SELECT * FROM unnest({_EVENT_ARRAYS})")

# --- lease -------------------------------------------------------------------

# SKIP LOCKED: replicas leasing at once take different messages and never wait for each other.
# One round trip takes the messages, their queued recipients, their small bodies and the next
# due time of what is left (one row with only next_due when nothing was due).
LEASE = _q(
    "WITH due AS (SELECT queue_id FROM messages WHERE state = 'queued'"
    " AND next_attempt <= :now ORDER BY next_attempt LIMIT :limit FOR UPDATE SKIP LOCKED),"
    " leased AS (UPDATE messages m SET state = 'sending', lease_owner = :owner,"
    " lease_until = :until, attempts = m.attempts + 1 FROM due WHERE m.queue_id = due.queue_id"
    " RETURNING m.queue_id, m.sender, m.received_at, m.attempts, m.message_id, m.key,"
    ' m.strategy, m.scope, m.size, m.smtputf8, m.body8bit, m.duplicate_of, m.rule, m."user",'
    " m.next_attempt),"
    " later AS (SELECT min(next_attempt) AS next_due FROM messages WHERE state = 'queued'"
    " AND queue_id NOT IN (SELECT queue_id FROM due))"
    " SELECT later.next_due, l.*, ARRAY(SELECT r.rcpt FROM recipients r"
    " WHERE r.queue_id = l.queue_id AND r.state = 'queued' ORDER BY r.rcpt) AS rcpts,"
    " CASE WHEN l.size <= :inline THEN (SELECT b.data FROM bodies b"
    " WHERE b.queue_id = l.queue_id) END AS data"
    " FROM later LEFT JOIN leased l ON true ORDER BY l.next_attempt, l.queue_id"
)
SELECT_BODY = _q("SELECT data FROM bodies WHERE queue_id = :queue_id")
UNLEASE = _q(
    "UPDATE messages SET state = 'queued', next_attempt = :next_attempt, lease_owner = NULL,"
    " lease_until = NULL, attempts = greatest(attempts - 1, 0)"
    " WHERE queue_id = :queue_id AND state = 'sending' AND lease_owner = :owner"
)
# The messages a lease whose COMMIT's answer was lost took, found by that lease's expiry (no
# other lease or renewal of the process wrote it), back to queued as if never leased.
UNLEASE_LOST = _q(
    "UPDATE messages SET state = 'queued', lease_owner = NULL, lease_until = NULL,"
    " attempts = greatest(attempts - 1, 0)"
    " WHERE state = 'sending' AND lease_owner = :owner AND lease_until = :until::float8"
)
# SKIP LOCKED: two replicas rescuing a dead one's leases at once rescue each message once.
STUCK_LEASES = _q(
    "SELECT queue_id, lease_owner FROM messages WHERE state = 'sending'"
    " AND (lease_owner = :owner OR lease_until < :now) ORDER BY queue_id FOR UPDATE SKIP LOCKED"
)
# While running: other owners' leases that ran out, never this process's own.
EXPIRED_LEASES = _q(
    "SELECT queue_id, lease_owner FROM messages WHERE state = 'sending' AND lease_until < :now"
    " AND lease_owner IS DISTINCT FROM :owner ORDER BY queue_id FOR UPDATE SKIP LOCKED"
)
# Only leases `owner` still holds are extended.
RENEW_LEASES = _q(
    "UPDATE messages SET lease_until = :until WHERE state = 'sending' AND lease_owner = :owner"
    " AND queue_id = ANY(:ids::text[]) RETURNING queue_id"
)

# --- instances -----------------------------------------------------------------

LOCK_INSTANCE = _q(f"SELECT pg_advisory_xact_lock({0x696E_7374}, hashtext(:name::text))")
SELECT_INSTANCE = _q(
    "SELECT name, host, pid, token, started, since, heartbeat FROM instances WHERE name = :name"
)
TAKE_INSTANCE = _q(
    "INSERT INTO instances (name, host, pid, token, started, since, heartbeat)"
    " VALUES (:name, :host, :pid, :token, :started, :since, :heartbeat)"
    " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
    " token = excluded.token, started = excluded.started, since = excluded.since,"
    " heartbeat = excluded.heartbeat"
)
HEARTBEAT_INSTANCE = _q(
    "UPDATE instances SET heartbeat = :now WHERE name = :name AND token = :token"
)
RELEASE_INSTANCE = _q("DELETE FROM instances WHERE name = :name AND token = :token")

# --- update ------------------------------------------------------------------

# Every recipient's outcome, the claims they settle or free, and what the message's events
# need, in one round trip. `others` are the states of the recipients this attempt did not
# touch (the data-modifying CTEs are not visible to the SELECT; the message is leased, so no one
# else changes them).
# A claim is found by its key, read from the message row (`own`: none for a message spooled
# without a claim), and touched only while this message still holds it. The key is built as
# relay.decision.namespaced_key builds it; strategy names are ASCII (the configuration checks
# header names), where lower() under "C" and Python's str.lower() agree.
UPDATE_RECIPIENTS = _q(
    "WITH own AS (SELECT scope, lower(strategy) || chr(31) || key AS key FROM messages"
    " WHERE queue_id = :queue_id AND scope IS NOT NULL AND key IS NOT NULL"
    " AND strategy IS NOT NULL),"
    " changed AS (UPDATE recipients r SET state = x.state, code = x.code, reply = x.reply,"
    " upstream_id = x.upstream_id, updated_at = :ts FROM unnest(:rcpts::text[],"
    " :states::text[], :codes::int4[], :replies::text[], :upstream_ids::text[])"
    " AS x (rcpt, state, code, reply, upstream_id)"
    " WHERE r.queue_id = :queue_id AND r.rcpt = x.rcpt),"
    " settled AS (UPDATE claims c SET pending = false FROM own WHERE c.scope = own.scope"
    " AND c.key = own.key AND c.rcpt = ANY(:settle::text[]) AND c.queue_id = :queue_id),"
    " freed AS (DELETE FROM claims c USING own WHERE c.scope = own.scope AND c.key = own.key"
    " AND c.rcpt = ANY(:release::text[]) AND c.queue_id = :queue_id)"
    ' SELECT m.key, m.strategy, m.message_id, m.sender, m.size, m.client, m."user", m.scope,'
    " ARRAY(SELECT DISTINCT state FROM recipients WHERE queue_id = :queue_id"
    " AND rcpt <> ALL(:rcpts::text[])) AS others FROM messages m WHERE m.queue_id = :queue_id"
)
END_LEASE = _q(
    "WITH ended AS (UPDATE messages SET state = :state, next_attempt = :next_attempt,"
    " lease_owner = NULL, lease_until = NULL, finished_at = :finished_at"
    " WHERE queue_id = :queue_id)"
    " DELETE FROM bodies WHERE queue_id = :queue_id AND :drop_body::boolean"
)
MESSAGE_STATE = _q("SELECT state FROM messages WHERE queue_id = :queue_id")
# Locked, so no replica takes the lease back between this look and the outcome it guards.
LEASE_OF = _q("SELECT state, lease_owner FROM messages WHERE queue_id = :queue_id FOR UPDATE")
RECIPIENTS_IN_STATE = _q(
    "SELECT rcpt FROM recipients WHERE queue_id = :queue_id AND state = :state ORDER BY rcpt"
)

# The later of now and one interval after the last booking, booked and returned at once.
RESERVE_SEND = _q(
    "INSERT INTO pacing (upstream, last_at) VALUES (:upstream, :now)"
    " ON CONFLICT (upstream) DO UPDATE SET last_at = greatest(pacing.last_at + :interval, :now)"
    " RETURNING last_at"
)

READY_PROBE = _q(
    "INSERT INTO meta (name, value) VALUES ('ready-probe', :now)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)

# --- purge -------------------------------------------------------------------
# A chunk at a time; the outer conditions are checked again on a row a concurrent claim has just
# taken over, so a purge never deletes a claim that became live meanwhile.

DELETE_EXPIRED_CLAIMS = _q(
    "DELETE FROM claims WHERE ctid = ANY(ARRAY(SELECT ctid FROM claims"
    " WHERE expires_at <= :cutoff AND NOT pending LIMIT :chunk FOR UPDATE SKIP LOCKED))"
    " AND expires_at <= :cutoff AND NOT pending"
)
DELETE_KEPT_BODIES = _q(
    "DELETE FROM bodies WHERE queue_id IN (SELECT b.queue_id FROM bodies b"
    " JOIN messages m USING (queue_id) WHERE m.state = 'done' AND m.finished_at <= :cutoff"
    " LIMIT :chunk)"
)
DELETE_OLD_EVENTS = _q(
    "DELETE FROM events WHERE id = ANY(ARRAY(SELECT id FROM events WHERE ts < :cutoff"
    " LIMIT :chunk))"
)
PURGE_MESSAGES = _q(
    "WITH gone AS (DELETE FROM messages WHERE queue_id IN (SELECT queue_id FROM messages"
    " WHERE state = 'done' AND finished_at < :cutoff LIMIT :chunk FOR UPDATE SKIP LOCKED)"
    " RETURNING queue_id),"
    " r AS (DELETE FROM recipients WHERE queue_id IN (SELECT queue_id FROM gone)),"
    " b AS (DELETE FROM bodies WHERE queue_id IN (SELECT queue_id FROM gone))"
    " SELECT count(*) FROM gone"
)
