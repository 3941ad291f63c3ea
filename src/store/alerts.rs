//! The alert outbox tables and their SQL (owned by the alerts work).

/// Schema version 2: the alert outbox.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE alert_state (
    connection TEXT NOT NULL,
    kind       TEXT NOT NULL,
    PRIMARY KEY (connection, kind)
);
"#;
