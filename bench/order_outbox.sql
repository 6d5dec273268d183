-- pgbench transaction: the least SQL a correct create needs, and what the service runs: the
-- order with its Idempotency-Key binding in one INSERT, its outbox event, one commit.
\set customer random(1, 100000)
BEGIN;
INSERT INTO orders (id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, version,
                    idempotency_key, idempotency_fingerprint, idempotency_expires_at)
VALUES (gen_random_uuid(), 'cust-' || :customer, '[{"sku":"SKU-1","quantity":2,"unit_price_minor":1250}]',
        'EUR', 2500, 'PENDING', NULL, now(), now(), 1,
        'anonymous|CreateOrder|' || gen_random_uuid(), sha256(convert_to(:customer::text, 'UTF8')), now() + interval '1 day');
INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload, traceparent, created_at, next_attempt_at)
VALUES (gen_random_uuid(), :customer % 16, 'order', 'o-' || :customer, 'orders.events.v1.OrderCreated',
        convert_to('{"orderId":"x","totalMinor":"2500"}', 'UTF8'),
        '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01', now(), now());
COMMIT;
