"""The PostgreSQL schema: the same tables as SQLite's, in PostgreSQL's own types.

Text compares and sorts byte by byte (`COLLATE "C"`), as SQLite's does, so keys,
queue ids and searches behave the same whatever the database's default locale;
`lower()` under "C" folds ASCII only, as SQLite's does. Timestamps stay seconds
as double precision, so cursors and windows mean the same on both backends.
Indexes that only serve one state are partial: the queue index holds queued
messages only, however long the audit trail grows.
"""

from __future__ import annotations

__all__ = ["CLAIMS_BY_KEY", "INSTANCES", "PACING", "PARTIAL_INDEXES", "TABLES"]

_T = 'text COLLATE "C"'

TABLES = f"""
CREATE TABLE IF NOT EXISTS meta (
    name  {_T} PRIMARY KEY,
    value {_T} NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    queue_id     {_T} PRIMARY KEY,
    received_at  double precision NOT NULL,
    state        {_T} NOT NULL,
    sender       {_T} NOT NULL,
    size         bigint NOT NULL,
    message_id   {_T},
    scope        {_T},
    key          {_T},
    strategy     {_T},
    fingerprint  {_T},
    rule         {_T},
    client       {_T},
    "user"       {_T},
    helo         {_T},
    smtputf8     boolean NOT NULL DEFAULT false,
    body8bit     boolean NOT NULL DEFAULT false,
    duplicate_of {_T},
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt double precision,
    lease_owner  {_T},
    lease_until  double precision,
    finished_at  double precision
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_attempt) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS messages_leased ON messages (lease_until) WHERE state = 'sending';
CREATE INDEX IF NOT EXISTS messages_pending ON messages (state, received_at)
    WHERE state IN ('queued', 'sending', 'held');
CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished_at) WHERE state = 'done';

CREATE TABLE IF NOT EXISTS bodies (
    queue_id {_T} PRIMARY KEY,
    data     bytea NOT NULL
);

CREATE TABLE IF NOT EXISTS recipients (
    queue_id    {_T} NOT NULL,
    rcpt        {_T} NOT NULL,
    state       {_T} NOT NULL,
    code        integer,
    reply       {_T},
    upstream_id {_T},
    updated_at  double precision NOT NULL,
    PRIMARY KEY (queue_id, rcpt)
);

CREATE TABLE IF NOT EXISTS claims (
    scope       {_T} NOT NULL,
    key         {_T} NOT NULL,
    rcpt        {_T} NOT NULL,
    queue_id    {_T} NOT NULL,
    fingerprint {_T} NOT NULL,
    claimed_at  double precision NOT NULL,
    expires_at  double precision NOT NULL,
    pending     boolean NOT NULL DEFAULT true,
    PRIMARY KEY (scope, key, rcpt)
);
CREATE INDEX IF NOT EXISTS claims_expiry ON claims (expires_at) WHERE NOT pending;
CREATE INDEX IF NOT EXISTS claims_queue ON claims (queue_id);

CREATE TABLE IF NOT EXISTS events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          double precision NOT NULL,
    event       {_T} NOT NULL,
    queue_id    {_T},
    key         {_T},
    strategy    {_T},
    message_id  {_T},
    sender      {_T},
    rcpts       {_T} NOT NULL DEFAULT '',
    size        bigint,
    client      {_T},
    "user"      {_T},
    upstream    {_T},
    code        integer,
    reply       {_T},
    upstream_id {_T},
    duration    double precision,
    original    {_T},
    action      {_T},
    detail      {_T}
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_queue ON events (queue_id);
CREATE INDEX IF NOT EXISTS events_message_id ON events (message_id);
CREATE INDEX IF NOT EXISTS events_key ON events (key);
CREATE INDEX IF NOT EXISTS events_original ON events (original);
CREATE INDEX IF NOT EXISTS events_event ON events (event, ts);
CREATE INDEX IF NOT EXISTS events_sender ON events (lower(sender), ts);
CREATE INDEX IF NOT EXISTS events_client ON events (client, ts);
CREATE INDEX IF NOT EXISTS events_user ON events ("user", ts) WHERE "user" IS NOT NULL;

-- One row per recipient of each event, for searches by recipient that page through an index.
-- Statement triggers fill and empty it: one INSERT per batch of events, whoever writes them.
CREATE TABLE IF NOT EXISTS event_rcpts (
    rcpt     {_T} NOT NULL,
    event_ts double precision NOT NULL,
    event_id bigint NOT NULL,
    PRIMARY KEY (rcpt, event_ts, event_id)
);
CREATE OR REPLACE FUNCTION relay_event_rcpts_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_rcpts (rcpt, event_ts, event_id)
    SELECT DISTINCT lower(r.rcpt), e.ts, e.id
    FROM added e CROSS JOIN LATERAL unnest(string_to_array(e.rcpts, ',')) AS r (rcpt)
    WHERE r.rcpt <> ''
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE OR REPLACE FUNCTION relay_event_rcpts_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM event_rcpts x
    USING removed e CROSS JOIN LATERAL unnest(string_to_array(e.rcpts, ',')) AS r (rcpt)
    WHERE x.rcpt = lower(r.rcpt) AND x.event_ts = e.ts AND x.event_id = e.id;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS events_rcpts_insert ON events;
CREATE TRIGGER events_rcpts_insert AFTER INSERT ON events
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT
    EXECUTE FUNCTION relay_event_rcpts_insert();
DROP TRIGGER IF EXISTS events_rcpts_delete ON events;
CREATE TRIGGER events_rcpts_delete AFTER DELETE ON events
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION relay_event_rcpts_delete();
"""

# One row per rate-limited upstream: the time booked for its latest transaction, shared by
# every replica so that the upstream's rate holds across all of them.
PACING = f"""
CREATE TABLE IF NOT EXISTS pacing (
    upstream {_T} PRIMARY KEY,
    last_at  double precision NOT NULL
);
"""

# One row per live process name (runtime.instance): who holds it, and when it last said so.
INSTANCES = f"""
CREATE TABLE IF NOT EXISTS instances (
    name      {_T} PRIMARY KEY,
    host      {_T} NOT NULL,
    pid       integer NOT NULL,
    token     {_T} NOT NULL,
    started   {_T} NOT NULL,
    since     double precision NOT NULL,
    heartbeat double precision NOT NULL
);
"""

# Every statement on the claim path finds a claim by its primary key (scope, key, rcpt): settling,
# freeing and unclaiming read the message's scope and key first, so the index on queue_id has no
# reader left and only cost every claim one more index entry to write. Purge keeps its own.
CLAIMS_BY_KEY = """
DROP INDEX IF EXISTS claims_queue;
"""

# As SQLite's step 6 (`messages_finished` was partial here from the start): only duplicates and
# conflicts name an `original`, so the other events stay out of its index.
PARTIAL_INDEXES = """
DROP INDEX IF EXISTS events_original;
CREATE INDEX events_original ON events (original) WHERE original IS NOT NULL;
"""
