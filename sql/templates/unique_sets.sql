-- UNIQUE_COUNT: exact distinct values per (subject, bucket, group values), per level.
-- Distinct counts do not add up across buckets, so the sets themselves are kept
-- and a query counts DISTINCT over every set row in its window. Only values that
-- count are stored (pgmeter_unique_value is not NULL).
--
-- Placeholders: {um1} {uq15} {ud1} {group_columns} {group_key}, as in rollup_tables.sql.

CREATE TABLE {um1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL,
    PRIMARY KEY (subject, bucket {group_key}, value)
);
CREATE INDEX ON {um1} (bucket);

CREATE TABLE {uq15} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL,
    PRIMARY KEY (subject, bucket {group_key}, value)
);
CREATE INDEX ON {uq15} (bucket);

CREATE TABLE {ud1} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    {group_columns}
    value   text COLLATE "C" NOT NULL,
    PRIMARY KEY (subject, bucket {group_key}, value)
);
CREATE INDEX ON {ud1} (bucket);
