-- Inbox (SQLite flavour of migrations/postgres).
CREATE TABLE inbox (
    consumer    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (consumer, message_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX inbox_received_at ON inbox (received_at);

CREATE TABLE inbox_rejection (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer        TEXT    NOT NULL,
    message_id      TEXT,
    topic           TEXT    NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset    INTEGER NOT NULL,
    event_type      TEXT,
    kind            TEXT    NOT NULL CHECK (kind IN ('rejected', 'dead-lettered')),
    reason          TEXT    NOT NULL,
    at              TEXT    NOT NULL
) STRICT;

CREATE TABLE customer_projection (
    customer_id  TEXT    PRIMARY KEY,
    display_name TEXT    NOT NULL,
    tier         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    updated_at   TEXT    NOT NULL
) STRICT;

ALTER TABLE orders ADD COLUMN payment_id TEXT;
ALTER TABLE orders ADD COLUMN payment_failure TEXT;
