-- The time floor of the events not merged yet, and the refresher's wake-up call.
--
-- The refresher's merges, the query tail, the meter views and the lag gauge all read
-- "the events with seq > last_seq". Filtered by seq alone, that probes the seq index
-- of every partition (a year of daily partitions: 365 probes, and as many planned and
-- locked relations). A bound on time would let Postgres prune partitions, but a bound
-- on time must be exact: late events carry old times, so "now minus a margin" would
-- drop them. The bound used is the least event time among the events written after
-- a given seq, read from this table: one row per (namespace, type) per INSERT or COPY
-- into events (one sink batch), written by a statement trigger in the same
-- transaction as the events, so a snapshot that sees an event sees its row too.
--
--   SELECT min(min_time) FROM event_floor
--    WHERE hi_seq > $last_seq AND ((namespace, type) = ($ns, $type) OR namespace IS NULL)
--
-- is a lower bound of the time of every event of ($ns, $type) with seq > $last_seq
-- visible in the same snapshot (hi_seq is the greatest seq of the statement's events
-- of that pair, so an event with seq > $last_seq has its row's hi_seq > $last_seq),
-- and NULL when there is none. The refresher compacts rows no meter needs any more
-- (hi_seq <= every meter's last_seq) into one row per pair (pgmeter.rollup.floor).
--
-- The trigger is on the partitioned parent, so it sees what is written through the
-- parent (the sink always is). A statement that writes into a partition directly, or
-- a table loaded and then attached, bypasses it: such a bulk load must insert its own
-- rows here (namespace, type, max(seq), min(time) per pair, in the same transaction
-- as the rows or before they are attached), or the refresher would not see its events.
--
-- A row with a NULL namespace stands for "any pair, unknown time" (min_time
-- -infinity): it is the seed for the events written before this migration, so the
-- bound is exact from the first statement on. Compaction keeps it at the lowest
-- last_seq, where it no longer matters to any meter that has caught up.
CREATE TABLE event_floor (
    namespace text,                 -- NULL: any namespace and type (the seed)
    type      text,
    hi_seq    bigint      NOT NULL, -- greatest seq of the pair's events in the statement
    min_time  timestamptz NOT NULL  -- least event time of the pair's events in the statement
);
CREATE INDEX event_floor_seq_idx ON event_floor (hi_seq);

-- One row per (namespace, type) of the statement's new events, and a notification
-- that wakes the refreshers (delivered at commit, once per transaction and channel:
-- a sink batch of 1,000 events sends one). The transition table is read once.
CREATE FUNCTION pgmeter_event_floor() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_floor (namespace, type, hi_seq, min_time)
    SELECT namespace, type, max(seq), min(time) FROM new_events GROUP BY namespace, type;
    PERFORM pg_notify('pgmeter_events', '');
    RETURN NULL;
END
$$;

-- CREATE TRIGGER takes SHARE ROW EXCLUSIVE on events: it waits for every writer in
-- flight, so the seed below covers every event committed without the trigger.
CREATE TRIGGER events_floor AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION pgmeter_event_floor();

INSERT INTO event_floor (namespace, type, hi_seq, min_time)
SELECT NULL, NULL, last_value, '-infinity'
  FROM events_seq
 WHERE is_called;
