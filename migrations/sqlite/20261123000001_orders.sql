-- Orders (SQLite flavour of migrations/postgres): ids are 16-byte blobs so they sort like
-- Postgres uuids; timestamps are RFC 3339 text; items are JSON text.
CREATE TABLE orders (
    id           BLOB    PRIMARY KEY CHECK (length(id) = 16),
    customer_id  TEXT    NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 64),
    items        TEXT    NOT NULL CHECK (json_valid(items)),
    currency     TEXT    NOT NULL CHECK (length(currency) = 3),
    total_minor  INTEGER NOT NULL CHECK (total_minor >= 0),
    status       TEXT    NOT NULL CHECK (status IN ('PENDING', 'PAID', 'CANCELLED')),
    note         TEXT    CHECK (length(note) <= 500),
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    version      INTEGER NOT NULL CHECK (version >= 1)
) STRICT, WITHOUT ROWID;
