-- Raw events, dedup and dead letters: everything the sink writes.

-- The refresher's watermark key. CACHE 1 matters: with cached values a session can
-- hand out a lower seq after a higher one is committed, and the lock-wait argument
-- that makes the watermark exact would no longer hold.
CREATE SEQUENCE events_seq AS bigint CACHE 1;

-- One row per accepted CloudEvent, range-partitioned by event time (UTC days by
-- default). There is no DEFAULT partition: attaching a partition next to a non-empty
-- default would scan and lock it, so partitions are created ahead and on demand.
CREATE TABLE events (
    seq         bigint      NOT NULL DEFAULT nextval('events_seq'),
    namespace   text        NOT NULL,
    id          text        NOT NULL,
    source      text        NOT NULL,
    type        text        NOT NULL,
    subject     text        NOT NULL,
    time        timestamptz NOT NULL,
    data        jsonb,
    ingested_at timestamptz NOT NULL,               -- when the api accepted it
    stored_at   timestamptz NOT NULL DEFAULT now(), -- when the sink committed it
    batch_seq   bigint      NOT NULL                -- JetStream sequence of its message
) PARTITION BY RANGE (time);

ALTER SEQUENCE events_seq OWNED BY events.seq;

-- Refresher deltas and the query tail read by seq.
CREATE INDEX events_seq_idx ON events (seq);
-- Meter backfills, raw edges and subject lists read by type and time.
CREATE INDEX events_type_time_idx ON events (namespace, type, time);
-- Event listing reads newest first.
CREATE INDEX events_time_idx ON events (namespace, time);

-- One row per (namespace, source, id) ever accepted. A unique key on the partitioned
-- table would have to include the partition key (time), and a retried event may
-- carry another time, so dedup lives in its own table. The key is a 16-byte hash of
-- the three fields (md5 fits a uuid exactly), which keeps the btree small.
CREATE TABLE event_dedup (
    key        uuid        PRIMARY KEY,
    event_time timestamptz NOT NULL
);

-- Messages the sink could not parse. They are acked so they never block the stream,
-- and kept here with the reason so nothing is lost.
CREATE TABLE dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    stream_seq  bigint      NOT NULL,
    item        int         NOT NULL,  -- index of the event in its message, -1 for all of it
    subject     text        NOT NULL,
    reason      text        NOT NULL,
    payload     bytea       NOT NULL
);
-- Redelivery of the same message dead-letters nothing twice.
CREATE UNIQUE INDEX dead_letters_item_idx ON dead_letters (stream_seq, item);
