-- Transactional outbox: events are inserted in the same transaction as the state change and
-- deleted by the relay once the broker acknowledged them.
CREATE TABLE outbox (
    seq             bigserial   PRIMARY KEY,          -- insertion order; per aggregate also commit order
    message_id      uuid        NOT NULL UNIQUE,      -- CloudEvents id; consumers dedupe on it
    partition       integer     NOT NULL CHECK (partition >= 0),  -- stable_hash(aggregate_id) mod P
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,             -- Kafka key
    event_type      text        NOT NULL,             -- CloudEvents type
    payload         bytea       NOT NULL,             -- proto3 JSON, published byte for byte
    traceparent     text,                             -- W3C trace context of the writing request
    tracestate      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);
CREATE INDEX outbox_partition_seq ON outbox (partition, seq);

-- Events the broker rejected for good (e.g. too large). Later events of the same aggregate
-- wait until the dead letter is replayed or deleted by an operator.
CREATE TABLE outbox_dead_letter (
    seq             bigint      PRIMARY KEY,          -- the original seq: replay restores the order
    message_id      uuid        NOT NULL UNIQUE,
    partition       integer     NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         bytea       NOT NULL,
    traceparent     text,
    tracestate      text,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    error           text        NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_dead_letter_aggregate ON outbox_dead_letter (aggregate_type, aggregate_id);

-- Relay membership (heartbeats) and partition leases. Plain rows and the database clock,
-- no advisory locks or session state, so this works behind PgBouncer in transaction mode.
CREATE TABLE outbox_relay (
    owner      text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE TABLE outbox_lease (
    partition  integer     PRIMARY KEY,
    owner      text,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
