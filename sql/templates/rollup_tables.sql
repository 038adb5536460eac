-- The rollup levels of one meter: minute (m1), 15 minutes (q15) and UTC day (d1).
--
-- A row holds the mergeable state of one (subject, bucket, group values) key:
-- cnt counts every event of the meter's type (so a key exists whenever an event
-- does), {state_columns} is what the aggregation needs (numeric, never float).
-- Buckets are UTC timestamptz on an epoch-aligned grid. q15 serves HOUR, DAY and
-- MONTH windows in every zone (real offsets are multiples of 15 minutes); d1 serves
-- totals and DAY/MONTH windows in zones at UTC+0. Coarse rows also keep the first
-- and last minute they saw, which a windowless query reports as its bounds.
--
-- Text keys sort bytewise (COLLATE "C"): cheaper to index and sort than a
-- linguistic collation, and the same order on every server.
--
-- Placeholders (filled with psycopg.sql, identifiers quoted): {m1} {q15} {d1}
-- {group_columns} ('g1 text COLLATE "C" NOT NULL, ...' with a trailing comma, or nothing),
-- {group_key} (", g1, ..." or nothing), {state_columns} (", sum numeric" ...).
-- fillfactor leaves room for HOT updates: merges update the state in place.

CREATE TABLE {m1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns},
    PRIMARY KEY (subject, bucket {group_key})
) WITH (fillfactor = 90);
CREATE INDEX ON {m1} (bucket);

CREATE TABLE {q15} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL,
    PRIMARY KEY (subject, bucket {group_key})
) WITH (fillfactor = 90);
CREATE INDEX ON {q15} (bucket);

CREATE TABLE {d1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL,
    PRIMARY KEY (subject, bucket {group_key})
) WITH (fillfactor = 90);
CREATE INDEX ON {d1} (bucket);
