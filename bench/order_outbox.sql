-- pgbench transaction: one order and its outbox event, as the write path commits them.
\set customer random(1, 100000)
BEGIN;
INSERT INTO orders (id, customer_id, items, currency, total_minor, status, note, created_at, updated_at, version)
VALUES (gen_random_uuid(), 'cust-' || :customer, '[{"sku":"SKU-1","quantity":2,"unit_price_minor":1250}]',
        'EUR', 2500, 'PENDING', NULL, now(), now(), 1);
INSERT INTO outbox (message_id, partition, aggregate_type, aggregate_id, event_type, payload, created_at, next_attempt_at)
VALUES (gen_random_uuid(), :customer % 16, 'order', 'o-' || :customer, 'orders.events.v1.OrderCreated',
        convert_to('{"orderId":"x","totalMinor":"2500"}', 'UTF8'), now(), now());
COMMIT;
