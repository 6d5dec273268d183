-- Relay correctness under faults: fencing epochs, one process per owner id, the recorded
-- partition count, and the index that finds each aggregate's oldest pending event.

-- Bumped every time a partition changes hands; settle statements check it, so a relay that
-- stalled past its lease cannot touch rows of a partition that moved on.
ALTER TABLE outbox_lease ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- The process behind an owner id: a second live process with the same id is refused.
ALTER TABLE outbox_relay ADD COLUMN instance uuid;

-- "No earlier row of this aggregate" is one index probe per candidate row.
CREATE INDEX outbox_aggregate_seq ON outbox (aggregate_type, aggregate_id, seq);
DROP INDEX outbox_dead_letter_aggregate;
CREATE INDEX outbox_dead_letter_aggregate ON outbox_dead_letter (aggregate_type, aggregate_id, seq);

-- The P rows were partitioned with, recorded at first start: a replica configured with
-- another P refuses to start (and its writes refuse to insert) instead of stranding rows.
CREATE TABLE outbox_meta (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 1024)
);
