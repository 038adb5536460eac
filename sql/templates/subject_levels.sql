-- Subject-only copies of the coarse levels, for meters with group-by keys.
--
-- Most reads group by subject alone (billing: usage per customer per hour or
-- day); without these they would add up every group's row. Same state as
-- rollup_tables.sql, keyed by (subject, bucket) only. Placeholders: {q15s} {d1s}
-- {state_columns}.

CREATE TABLE {q15s} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL,
    PRIMARY KEY (subject, bucket)
) WITH (fillfactor = 90);
CREATE INDEX ON {q15s} (bucket);

CREATE TABLE {d1s} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL,
    PRIMARY KEY (subject, bucket)
) WITH (fillfactor = 90);
CREATE INDEX ON {d1s} (bucket);
