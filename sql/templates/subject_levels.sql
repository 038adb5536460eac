-- Subject-only copies of the coarse levels, for meters with group-by keys.
--
-- Most reads group by subject alone (billing: usage per customer per hour or
-- day); without these they would add up every group's row. Same state as
-- rollup_tables.sql, keyed by (hash of subject, bucket) only. Placeholders: {q15s} {d1s}
-- {state_columns}.

CREATE TABLE {q15s} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL
) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {q15s} ((md5(subject)::uuid), bucket);
CREATE INDEX ON {q15s} (bucket);

CREATE TABLE {d1s} (
    subject text COLLATE "C" NOT NULL,
    bucket  timestamptz      NOT NULL,
    cnt     bigint           NOT NULL
    {state_columns},
    t_min   timestamptz      NOT NULL,
    t_max   timestamptz      NOT NULL
) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {d1s} ((md5(subject)::uuid), bucket);
CREATE INDEX ON {d1s} (bucket);
