-- Outbox (SQLite flavour of migrations/postgres). SQLite is single-process, so there are
-- no lease tables: the one relay owns every partition.
CREATE TABLE outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused
    message_id      BLOB    NOT NULL UNIQUE,
    partition       INTEGER NOT NULL CHECK (partition >= 0),
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    traceparent     TEXT,
    tracestate      TEXT,
    created_at      TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_error      TEXT
) STRICT;
CREATE INDEX outbox_partition_seq ON outbox (partition, seq);

CREATE TABLE outbox_dead_letter (
    seq             INTEGER PRIMARY KEY,
    message_id      BLOB    NOT NULL UNIQUE,
    partition       INTEGER NOT NULL,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    traceparent     TEXT,
    tracestate      TEXT,
    created_at      TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    error           TEXT    NOT NULL,
    dead_at         TEXT    NOT NULL
) STRICT;
CREATE INDEX outbox_dead_letter_aggregate ON outbox_dead_letter (aggregate_type, aggregate_id);
