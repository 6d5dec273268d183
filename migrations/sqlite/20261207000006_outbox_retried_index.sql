-- The relay's head rule needs an index only over rows in backoff (see migrations/postgres).
DROP INDEX outbox_aggregate_seq;
CREATE INDEX outbox_retried_aggregate_seq ON outbox (aggregate_type, aggregate_id, seq) WHERE attempts > 0;
