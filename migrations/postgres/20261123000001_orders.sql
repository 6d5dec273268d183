-- Orders: the aggregate this service owns. Line items live inside the row (jsonb) because
-- they are only ever read and written with their order.
CREATE TABLE orders (
    id           uuid        PRIMARY KEY,              -- UUID v7: time ordered, index friendly
    customer_id  text        NOT NULL CHECK (char_length(customer_id) BETWEEN 1 AND 64),
    items        jsonb       NOT NULL,
    currency     text        NOT NULL CHECK (char_length(currency) = 3),
    total_minor  bigint      NOT NULL CHECK (total_minor >= 0),
    status       text        NOT NULL CHECK (status IN ('PENDING', 'PAID', 'CANCELLED')),
    note         text        CHECK (char_length(note) <= 500),
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    version      bigint      NOT NULL CHECK (version >= 1)
);
