-- Inbox: one row per consumed message id, inserted in the transaction that applies the
-- message's effect, so a redelivered message is recognised and has no second effect.
CREATE TABLE inbox (
    consumer    text        NOT NULL,                 -- e.g. orders-service/payments.events
    message_id  text        NOT NULL,                 -- CloudEvents id
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX inbox_received_at ON inbox (received_at);  -- retention purge

-- Messages that were understood but not applied (payment for an unknown or non-PENDING
-- order, amount mismatch), and poison messages sent to a DLQ: visible to operators.
CREATE TABLE inbox_rejection (
    id          bigserial   PRIMARY KEY,
    consumer    text        NOT NULL,
    message_id  text,                                 -- absent when the message had no ce_id
    topic       text        NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint     NOT NULL,
    event_type  text,
    kind        text        NOT NULL CHECK (kind IN ('rejected', 'dead-lettered')),
    reason      text        NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

-- Read model of customers, fed by customers.events; only newer versions replace older ones.
CREATE TABLE customer_projection (
    customer_id  text        PRIMARY KEY,
    display_name text        NOT NULL,
    tier         text        NOT NULL,
    version      bigint      NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- Payment facts on the order.
ALTER TABLE orders ADD COLUMN payment_id text;
ALTER TABLE orders ADD COLUMN payment_failure text;
