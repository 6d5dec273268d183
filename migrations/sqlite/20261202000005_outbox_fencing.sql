-- Relay correctness under faults (SQLite flavour of migrations/postgres). SQLite has one
-- relay and no leases; it shares the head index and the recorded partition count.
CREATE INDEX outbox_aggregate_seq ON outbox (aggregate_type, aggregate_id, seq);
DROP INDEX outbox_dead_letter_aggregate;
CREATE INDEX outbox_dead_letter_aggregate ON outbox_dead_letter (aggregate_type, aggregate_id, seq);

CREATE TABLE outbox_meta (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    partitions INTEGER NOT NULL CHECK (partitions BETWEEN 1 AND 1024)
) STRICT;
