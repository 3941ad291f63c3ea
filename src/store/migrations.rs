//! Versioned schema migrations, applied in order inside one transaction each.
//!
//! `PRAGMA user_version` records how many have run. Append new steps; never
//! edit a released one.

/// Every migration, in order. Index + 1 is the schema version it produces.
pub(super) const MIGRATIONS: &[&str] = &[V1_CORE, super::alerts::SCHEMA];

/// Version 1: keys, connections with claim columns, events, authorizations, change tracking.
const V1_CORE: &str = r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('change_seq', 0);

CREATE TABLE keys (
    key_id      TEXT PRIMARY KEY,
    check_value BLOB NOT NULL,
    added_at    INTEGER NOT NULL
);

CREATE TABLE connections (
    id                      TEXT PRIMARY KEY,
    name                    TEXT NOT NULL UNIQUE,
    instance                TEXT NOT NULL,
    client_id               TEXT NOT NULL,
    labels                  TEXT NOT NULL DEFAULT '{}',
    mode                    TEXT NOT NULL,
    lifetime_s              INTEGER NOT NULL,
    absolute_lifetime_s     INTEGER,
    secret_expires_at       INTEGER,
    grant_issued_at         INTEGER,
    refresh_token_issued_at INTEGER,
    access_expires_at       INTEGER,
    access_lifetime_s       INTEGER,
    token_type              TEXT,
    deadline                INTEGER,
    deadline_source         TEXT,
    next_refresh_at         INTEGER,
    last_refresh_at         INTEGER,
    last_error              TEXT,
    state                   TEXT NOT NULL,
    failures                INTEGER NOT NULL DEFAULT 0,
    failing_since           INTEGER,
    outcome_unknown         INTEGER NOT NULL DEFAULT 0,
    client_secret           BLOB,
    refresh_token           BLOB,
    access_token            BLOB,
    version                 INTEGER NOT NULL DEFAULT 0,
    claim_id                TEXT,
    claim_owner             TEXT,
    claim_expires_at        INTEGER,
    change_seq              INTEGER NOT NULL DEFAULT 0,
    created_at              INTEGER NOT NULL
);
CREATE INDEX connections_change ON connections (change_seq);

-- Removed connections, so a running daemon can drop them without rescanning.
CREATE TABLE tombstones (
    id         TEXT PRIMARY KEY,
    change_seq INTEGER NOT NULL
);

CREATE TABLE events (
    id            INTEGER PRIMARY KEY,
    connection_id TEXT NOT NULL,
    at            INTEGER NOT NULL,
    event         TEXT NOT NULL,
    detail        TEXT NOT NULL
);
CREATE INDEX events_connection ON events (connection_id, at);
CREATE INDEX events_at ON events (at);

-- Authorization links: the state is stored hashed; used rows stay so a second
-- visit can say "already connected".
CREATE TABLE authorizations (
    state_hash    TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL,
    pkce_verifier BLOB NOT NULL,
    redirect_uri  TEXT NOT NULL,
    url           TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    used_at       INTEGER
);
CREATE INDEX authorizations_connection ON authorizations (connection_id);
"#;
