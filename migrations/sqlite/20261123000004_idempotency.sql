-- Idempotency-Key backstop (SQLite flavour of migrations/postgres).
ALTER TABLE orders ADD COLUMN idempotency_key TEXT;
ALTER TABLE orders ADD COLUMN idempotency_fingerprint BLOB;
ALTER TABLE orders ADD COLUMN idempotency_expires_at TEXT;
CREATE UNIQUE INDEX orders_idempotency_key ON orders (idempotency_key);
