-- The relay no longer probes every candidate row for an earlier event of its aggregate: a
-- fetch reads each partition in seq order, so an earlier event that is due and not in
-- flight is read first anyway. Only earlier events in backoff (attempts > 0) still need a
-- probe, and this partial index holds just those: empty while the broker is healthy, so
-- the probe is nearly free and writes no longer maintain an index over every row.
DROP INDEX outbox_aggregate_seq;
CREATE INDEX outbox_retried_aggregate_seq ON outbox (aggregate_type, aggregate_id, seq) WHERE attempts > 0;
