-- UNIQUE_COUNT: exact distinct values per (subject, bucket, group values), per level.
-- Distinct counts do not add up across buckets, so the sets themselves are kept
-- and a query counts DISTINCT over every set row in its window. Only values that
-- count are stored (pgmeter_unique_value is not NULL).
--
-- The value, like every text key, is in the unique index as its md5 only (any
-- length works). Placeholders: {um1} {uq15} {ud1} {group_columns} {key}, as in
-- rollup_tables.sql.

CREATE TABLE {um1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL
);
CREATE UNIQUE INDEX ON {um1} ({key}, (md5(value)::uuid));
CREATE INDEX ON {um1} (bucket);

CREATE TABLE {uq15} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL
);
CREATE UNIQUE INDEX ON {uq15} ({key}, (md5(value)::uuid));
CREATE INDEX ON {uq15} (bucket);

CREATE TABLE {ud1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL
);
CREATE UNIQUE INDEX ON {ud1} ({key}, (md5(value)::uuid));
CREATE INDEX ON {ud1} (bucket);
