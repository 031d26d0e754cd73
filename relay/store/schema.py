"""The SQLite schema: tables for the queue, the dedupe claims and the audit trail.

Each part is one versioned migration (`relay.store.migrations`); a new column or
index goes into a new part, never into an old one, so every store reaches the
same schema by the same steps.
"""

from __future__ import annotations

__all__ = [
    "CLUSTERED_CLAIMS",
    "INSTANCES",
    "PACING",
    "PARTIAL_INDEXES",
    "PRAGMAS",
    "REVIEW",
    "TABLES",
]

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


def _split(rcpts: str) -> str:
    """`a,b` as the JSON array `["a","b"]`; json_quote escapes, and no escape holds a comma."""
    return f"'[' || replace(json_quote({rcpts}), ',', '\",\"') || ']'"


# Review searches page through an index in (value, ts) order (keyset paging), so a search costs
# the page it shows, not a scan of the whole audit trail. `rcpts` is a comma-joined list no index
# can search, so `event_rcpts` holds one row per recipient of each event; triggers keep it in
# step with every insert and purge, whoever writes the event (a one-recipient event, the common
# case, skips the JSON split).
REVIEW = f"""
CREATE INDEX IF NOT EXISTS events_event ON events (event, ts);
CREATE INDEX IF NOT EXISTS events_sender ON events (sender COLLATE NOCASE, ts);
CREATE INDEX IF NOT EXISTS events_client ON events (client, ts);
CREATE INDEX IF NOT EXISTS events_user ON events (user, ts) WHERE user IS NOT NULL;

CREATE TABLE IF NOT EXISTS event_rcpts (
    rcpt     TEXT NOT NULL,
    event_ts REAL NOT NULL,
    event_id INTEGER NOT NULL,
    PRIMARY KEY (rcpt, event_ts, event_id)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS events_rcpt_insert AFTER INSERT ON events
WHEN NEW.rcpts <> '' AND instr(NEW.rcpts, ',') = 0 BEGIN
    INSERT OR IGNORE INTO event_rcpts (rcpt, event_ts, event_id)
    VALUES (lower(NEW.rcpts), NEW.ts, NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS events_rcpts_insert AFTER INSERT ON events
WHEN instr(NEW.rcpts, ',') > 0 BEGIN
    INSERT OR IGNORE INTO event_rcpts (rcpt, event_ts, event_id)
    SELECT lower(value), NEW.ts, NEW.id FROM json_each({_split("NEW.rcpts")}) WHERE value <> '';
END;
CREATE TRIGGER IF NOT EXISTS events_rcpts_delete AFTER DELETE ON events
WHEN OLD.rcpts <> '' BEGIN
    DELETE FROM event_rcpts WHERE event_id = OLD.id AND event_ts = OLD.ts
    AND rcpt IN (SELECT lower(value) FROM json_each({_split("OLD.rcpts")}));
END;
-- A store made before event_rcpts existed is filled once; `todo` first, so later opens skip it.
INSERT OR IGNORE INTO event_rcpts (rcpt, event_ts, event_id)
SELECT lower(r.value), e.ts, e.id
FROM (SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM meta WHERE name = 'event_rcpts')) AS todo
CROSS JOIN events e, json_each({_split("e.rcpts")}) r
WHERE e.rcpts <> '' AND r.value <> '';
INSERT OR IGNORE INTO meta (name, value) VALUES ('event_rcpts', 'filled');
"""

# One row per rate-limited upstream: the time booked for its latest transaction.
PACING = """
CREATE TABLE IF NOT EXISTS pacing (
    upstream TEXT PRIMARY KEY,
    last_at  REAL NOT NULL
) WITHOUT ROWID;
"""

# One row per live process name (runtime.instance): who holds it, and when it last said so.
INSTANCES = """
CREATE TABLE IF NOT EXISTS instances (
    name      TEXT PRIMARY KEY,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    token     TEXT NOT NULL,
    started   TEXT NOT NULL,
    since     REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""

# The claims clustered on their primary key: one B-tree holds each row under (scope, key,
# rcpt), where a rowid table kept the row and repeated those columns in a unique index. Every
# statement on the claim path finds a claim by that key: settling and releasing read the
# message's scope and key first, so the index on queue_id goes. Purge keeps its expiry index.
# Rebuilt in place, inside the migration's transaction; the copy runs in key order, so the
# new tree is written by appending.
_CLAIM_COLUMNS = "scope, key, rcpt, queue_id, fingerprint, claimed_at, expires_at, pending"
CLUSTERED_CLAIMS = f"""
CREATE TABLE claims_clustered (
    scope       TEXT NOT NULL,
    key         TEXT NOT NULL,
    rcpt        TEXT NOT NULL,
    queue_id    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    claimed_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    pending     INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (scope, key, rcpt)
) WITHOUT ROWID;
INSERT INTO claims_clustered ({_CLAIM_COLUMNS})
SELECT {_CLAIM_COLUMNS} FROM claims ORDER BY scope, key, rcpt;
DROP TABLE claims;
ALTER TABLE claims_clustered RENAME TO claims;
CREATE INDEX claims_expiry ON claims (expires_at);
"""

# Two indexes hold only the rows their searches can find: purge looks for finished messages
# only once they are done, and only duplicates and conflicts name an `original`. Every row
# they skip is an index page the accept's or the outcome's commit no longer writes to the WAL.
PARTIAL_INDEXES = """
DROP INDEX IF EXISTS messages_finished;
CREATE INDEX messages_finished ON messages (finished_at) WHERE state = 'done';
DROP INDEX IF EXISTS events_original;
CREATE INDEX events_original ON events (original) WHERE original IS NOT NULL;
"""
