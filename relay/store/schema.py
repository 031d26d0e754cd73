"""The SQLite schema: tables for the queue, the dedupe claims and the audit trail."""

from __future__ import annotations

__all__ = ["PRAGMAS", "TABLES", "VERSION"]

VERSION = 1

PRAGMAS = (
    # First, so that processes opening one store at once wait for each other's set-up.
    "PRAGMA busy_timeout=10000",
    "PRAGMA journal_mode=WAL",
    # FULL: a commit survives power loss, not only a crash of this process.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=OFF",
)

TABLES = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    queue_id     TEXT PRIMARY KEY,
    received_at  REAL NOT NULL,
    state        TEXT NOT NULL,
    sender       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    message_id   TEXT,
    scope        TEXT,
    key          TEXT,
    strategy     TEXT,
    fingerprint  TEXT,
    rule         TEXT,
    client       TEXT,
    user         TEXT,
    helo         TEXT,
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    body8bit     INTEGER NOT NULL DEFAULT 0,
    duplicate_of TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    lease_owner  TEXT,
    lease_until  REAL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt);
CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished_at);

CREATE TABLE IF NOT EXISTS bodies (
    queue_id TEXT PRIMARY KEY,
    data     BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS recipients (
    queue_id    TEXT NOT NULL,
    rcpt        TEXT NOT NULL,
    state       TEXT NOT NULL,
    code        INTEGER,
    reply       TEXT,
    upstream_id TEXT,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (queue_id, rcpt)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS claims (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    rcpt        TEXT NOT NULL,
    queue_id    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    claimed_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    pending     INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (scope, key, rcpt)
);
CREATE INDEX IF NOT EXISTS claims_expiry ON claims (expires_at);
CREATE INDEX IF NOT EXISTS claims_queue ON claims (queue_id);

CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    ts          REAL NOT NULL,
    event       TEXT NOT NULL,
    queue_id    TEXT,
    key         TEXT,
    strategy    TEXT,
    message_id  TEXT,
    sender      TEXT,
    rcpts       TEXT NOT NULL DEFAULT '',
    size        INTEGER,
    client      TEXT,
    user        TEXT,
    upstream    TEXT,
    code        INTEGER,
    reply       TEXT,
    upstream_id TEXT,
    duration    REAL,
    original    TEXT,
    action      TEXT,
    detail      TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_queue ON events (queue_id);
CREATE INDEX IF NOT EXISTS events_message_id ON events (message_id);
CREATE INDEX IF NOT EXISTS events_key ON events (key);
CREATE INDEX IF NOT EXISTS events_original ON events (original);
"""
