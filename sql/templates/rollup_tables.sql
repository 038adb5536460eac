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
-- Text keys sort bytewise (COLLATE "C"): cheaper to sort than a linguistic
-- collation, and the same order on every server.
--
-- The key is unique on the md5 of each text key (subject first, then bucket, then
-- the group values) rather than on the texts: subjects and group-by values come
-- from event data and may be of any length, while a btree entry must stay under
-- ~2.7 KB. The texts are kept whole in the row (TOASTed when long) and read from
-- there; the 16-byte hashes live only in the index. Subject first keeps queries
-- filtered by subject (a portal, billing per customer) to their own rows; the
-- bucket index serves the time-range reads.
--
-- Placeholders (filled with psycopg.sql, identifiers quoted): {m1} {q15} {d1}
-- {group_columns} ('g1 text COLLATE "C" NOT NULL, ...' with a trailing comma, or nothing),
-- {key} ("(md5(subject)::uuid), bucket, (md5(g1)::uuid), ..."), {state_columns} (", sum numeric" ...).
-- fillfactor leaves room for HOT updates: merges update the state in place.

CREATE TABLE {m1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns}
) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {m1} ({key});
CREATE INDEX ON {m1} (bucket);

CREATE TABLE {q15} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL
) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {q15} ({key});
CREATE INDEX ON {q15} (bucket);

CREATE TABLE {d1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL
) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {d1} ({key});
CREATE INDEX ON {d1} (bucket);
