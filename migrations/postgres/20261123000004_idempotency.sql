-- Idempotency-Key backstop: an order keeps the scoped key (SHA-256 hex of caller, method,
-- route and key) and the request fingerprint of the create that made it. The unique index
-- makes concurrent duplicates resolve to one order even when Redis lost the key.
ALTER TABLE orders ADD COLUMN idempotency_key text;
ALTER TABLE orders ADD COLUMN idempotency_fingerprint bytea;
ALTER TABLE orders ADD COLUMN idempotency_expires_at timestamptz;
CREATE UNIQUE INDEX orders_idempotency_key ON orders (idempotency_key);
