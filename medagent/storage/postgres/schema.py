"""
The relay's PostgreSQL schema, as numbered migrations (L{PgDatabase} applies the ones newer
than C{schema_version} at start).  Never edit a released migration: add the next one.

JSON (resources, push options, delivery payloads) is kept as C{text}, byte for byte what the
SQLite backend keeps: nothing searches inside it in SQL (the C{search_index} rows do), and
C{jsonb} would refuse some strings JSON allows (``\\u0000``, lone surrogates in escapes).
Ordered and prefix-searched text is C{COLLATE "C"}: byte order whatever the cluster's locale
(ISO instants sort as times; C{LIKE 'x%'} can use the index).
"""

from __future__ import annotations

V1 = """
CREATE SEQUENCE resource_write_seq;
CREATE TABLE resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT COLLATE "C" NOT NULL,
    write_seq BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    content TEXT NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE INDEX resources_order ON resources (type, last_updated, write_seq);
CREATE TABLE search_index (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    system TEXT,
    value TEXT COLLATE "C" NOT NULL
);
CREATE INDEX search_by_value ON search_index (type, param, value);
CREATE INDEX search_by_id ON search_index (type, id);

CREATE TABLE clients (
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    client_id TEXT PRIMARY KEY,
    salt BYTEA NOT NULL,
    secret_hash BYTEA NOT NULL,
    role TEXT NOT NULL,
    agents TEXT NOT NULL DEFAULT '[]',
    name TEXT,
    created DOUBLE PRECISION NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT false
);

CREATE TABLE pushes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    remote TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body TEXT NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    state TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    reply_status INTEGER,
    reply_content_type TEXT,
    reply_body TEXT,
    requester TEXT,
    control_id TEXT,
    body_hash TEXT,
    in_doubt BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX pushes_open ON pushes (agent_id, state, seq);
CREATE INDEX pushes_agent_seq ON pushes (agent_id, seq);
CREATE INDEX pushes_key ON pushes (requester, idempotency_key);
CREATE INDEX pushes_message ON pushes (agent_id, control_id, body_hash);
CREATE TABLE push_keys (
    requester TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    push_id TEXT NOT NULL REFERENCES pushes (id) ON DELETE CASCADE,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (requester, idempotency_key)
);
CREATE INDEX push_keys_push ON push_keys (push_id);

CREATE TABLE subscription_deliveries (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    subscription_id TEXT NOT NULL,
    interaction TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    version_id TEXT,
    payload TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    leased BOOLEAN NOT NULL DEFAULT false,
    next_attempt DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
CREATE INDEX subscription_deliveries_due ON subscription_deliveries (state, next_attempt);
CREATE INDEX subscription_deliveries_lane
    ON subscription_deliveries (subscription_id, resource_type, resource_id, state);
"""

#: Which relay node holds each agent's websocket (L{medagent.storage.postgres.sessions}).
V2 = """
CREATE TABLE agent_sessions (
    agent_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    connected_at TIMESTAMPTZ NOT NULL,
    lease_expires TIMESTAMPTZ NOT NULL
);
CREATE INDEX agent_sessions_node ON agent_sessions (node_id);
"""

#: Agent operations asked on one node of an agent another node holds
#: (L{medagent.storage.postgres.calls}); the token signing keys every node shares
#: (L{medagent.storage.postgres.keys}).
V3 = """
CREATE TABLE agent_calls (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    from_node TEXT NOT NULL,
    request TEXT NOT NULL,
    answer TEXT,
    taken BOOLEAN NOT NULL DEFAULT false,
    deadline TIMESTAMPTZ NOT NULL
);
CREATE INDEX agent_calls_open ON agent_calls (node_id) WHERE NOT taken;
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    secret BYTEA NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    retired TIMESTAMPTZ
);
"""

#: Where each push's time went (L{medagent.storage.journal.Push.timeline}), JSON text.
V4 = """
ALTER TABLE pushes ADD COLUMN timeline TEXT NOT NULL DEFAULT '{}';
"""

#: The console (issue 12): the order / accession number of a push and the push it resends,
#: and indexes for its searches (by MSH-10, by order number, failures by time).
V5 = """
ALTER TABLE pushes ADD COLUMN accession TEXT;
ALTER TABLE pushes ADD COLUMN resent_from TEXT;
CREATE INDEX pushes_control ON pushes (control_id, seq);
CREATE INDEX pushes_accession ON pushes (accession, seq);
CREATE INDEX pushes_state_updated ON pushes (state, updated);
"""

#: Inbound messages and search (issue 12): the inbound log (L{medagent.storage.inbound}),
#: and a push's patient id and DICOM Study / SOP Instance UID, indexed for the console's
#: search.  (6 and 8 are other features': nothing here depends on them.)
V7 = """
CREATE TABLE inbound (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    agent_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    remote TEXT,
    received DOUBLE PRECISION NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    message_type TEXT,
    control_id TEXT,
    patient_id TEXT,
    accession TEXT,
    study_uid TEXT,
    sop_uid TEXT,
    status INTEGER,
    ack_code TEXT,
    outcome TEXT NOT NULL,
    bot TEXT,
    duration_ms DOUBLE PRECISION,
    error_kind TEXT,
    body TEXT
);
CREATE INDEX inbound_agent ON inbound (agent_id, channel, seq);
CREATE INDEX inbound_received ON inbound (received);
CREATE INDEX inbound_control ON inbound (control_id, seq);
CREATE INDEX inbound_patient ON inbound (patient_id, seq);
CREATE INDEX inbound_accession ON inbound (accession, seq);
CREATE INDEX inbound_study ON inbound (study_uid, seq);
CREATE INDEX inbound_sop ON inbound (sop_uid, seq);
ALTER TABLE pushes ADD COLUMN patient_id TEXT;
ALTER TABLE pushes ADD COLUMN study_uid TEXT;
ALTER TABLE pushes ADD COLUMN sop_uid TEXT;
CREATE INDEX pushes_patient ON pushes (patient_id, seq);
CREATE INDEX pushes_study ON pushes (study_uid, seq);
CREATE INDEX pushes_sop ON pushes (sop_uid, seq);
"""

#: Lanes an operator paused (L{medagent.storage.postgres.pauses}).
V8 = """
CREATE TABLE IF NOT EXISTS lane_pauses (
    agent_id TEXT NOT NULL,
    lane TEXT COLLATE "C" NOT NULL,
    paused_by TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (agent_id, lane)
);
"""

#: The console's sign-in sessions, shared by the nodes (L{medagent.storage.postgres.console}):
#: a browser signed in on one node is signed in on all of them.  The session id itself is
#: never stored, only its SHA-256 (whoever reads the table cannot take over a session).
V9 = """
CREATE TABLE console_sessions (
    id_hash BYTEA PRIMARY KEY,
    client_id TEXT NOT NULL,
    role TEXT NOT NULL,
    agents TEXT NOT NULL DEFAULT '[]',
    name TEXT,
    csrf TEXT NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX console_sessions_client ON console_sessions (client_id);
CREATE INDEX console_sessions_seen ON console_sessions (last_seen);
"""

#: (version, SQL) in order; L{medagent.storage.postgres.database.PgDatabase} applies them.
MIGRATIONS: tuple[tuple[int, str], ...] = ((1, V1), (2, V2), (3, V3), (4, V4), (5, V5),
                                           (7, V7), (8, V8), (9, V9))

#: The tables holding data (what a test empties between tests; never C{schema_version}).
DATA_TABLES = ("resources", "search_index", "clients", "push_keys", "pushes",
               "subscription_deliveries", "agent_sessions", "agent_calls", "signing_keys",
               "lane_pauses", "console_sessions", "inbound")
