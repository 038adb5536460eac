-- event_dedup partitioned like events, by the UTC day of the event's time.
--
-- One btree of every key ever claimed made each insert a random leaf of an index
-- that grows without end: 2.2x the cost per key from 1M to 10M keys (bench/writes),
-- and at hundreds of millions a disk read per key. Partitioned by event day, with
-- the same spans as the events partitions (pgmeter.sink.partitions creates and drops
-- both together), a batch's lookup and COPY touch the small, hot indexes of the days
-- its events fall in, and retention drops a day's keys with its events instead of
-- deleting them key by key.
--
-- The key is unique per (namespace, source, id) within an event day: a redelivered
-- or re-sent event (same time) is found, whatever its age within the accepted window
-- (limits.eventMaxAge, sink.retentionDays). An event re-sent with the same id but a
-- time on another UTC day is a new event - the CloudEvents rule is that id and
-- source identify one occurrence, whose time does not change.
--
-- day is days since 1970-01-01 (integer, so the partition key is cheap and the sink
-- computes it from the time it already holds as microseconds). Existing keys move
-- with their day into partitions mirroring the existing events partitions; a key
-- whose day no events partition covers has no stored event left (retention deleted
-- both) and is not carried over.
ALTER TABLE event_dedup RENAME TO event_dedup_old;
ALTER INDEX event_dedup_pkey RENAME TO event_dedup_old_pkey;

CREATE TABLE event_dedup (
    key uuid NOT NULL,
    day int  NOT NULL,
    PRIMARY KEY (key, day)
) PARTITION BY RANGE (day);

CREATE TEMP TABLE dedup_bounds (lo int NOT NULL, hi int NOT NULL) ON COMMIT DROP;

DO $$
DECLARE
    p      record;
    bound  text[];
    lo     int;
    hi     int;
BEGIN
    FOR p IN SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS spec
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'events'::regclass
    LOOP
        bound := regexp_match(p.spec, $r$FROM \('([^']+)'\) TO \('([^']+)'\)$r$);
        CONTINUE WHEN bound IS NULL;  -- MINVALUE/MAXVALUE bounds: not pgmeter's
        lo := floor(extract(epoch FROM bound[1]::timestamptz) / 86400)::int;
        hi := floor(extract(epoch FROM bound[2]::timestamptz) / 86400)::int;
        EXECUTE format('CREATE TABLE %I PARTITION OF event_dedup FOR VALUES FROM (%s) TO (%s)',
                       'event_dedup_' || substr(p.relname, length('events_') + 1), lo, hi);
        INSERT INTO dedup_bounds VALUES (lo, hi);
    END LOOP;
END
$$;

INSERT INTO event_dedup (key, day)
SELECT o.key, d.day
  FROM event_dedup_old o
 CROSS JOIN LATERAL (SELECT floor(extract(epoch FROM o.event_time) / 86400)::int AS day) d
 WHERE EXISTS (SELECT 1 FROM dedup_bounds b WHERE d.day >= b.lo AND d.day < b.hi);

DROP TABLE event_dedup_old;
