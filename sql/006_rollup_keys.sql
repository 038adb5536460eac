-- Rollups that accept any value length, and meters whose merge fails set aside.
--
-- 1. Rollup keys by hash. A subject, group-by value or UNIQUE_COUNT value comes
--    from event data and may be of any length, but a btree entry over ~2.7 KB
--    fails, and a meter whose merge fails on it stopped merging. Rollup tables are
--    now unique on (md5(subject)::uuid, bucket, md5(g1)::uuid, ...) instead of a
--    primary key on the texts: the texts stay whole in the row (queries and views
--    read them from there), the index holds 16 bytes per text. The bucket index
--    stays as it is.
--
--    Existing rollups are carried over in place, not rebuilt from events: their
--    rows are already exact, and events older than sink.retentionDays may be gone,
--    so a rebuild could lose history. Only the key changes (the old primary key on
--    the texts guarantees the new unique index holds). The cost is one index build
--    per rollup table, proportional to the rollups, not to the events.
--
-- 2. Failure state per meter (the refresher's isolation): a meter whose merge fails
--    is set aside until next_attempt with exponential backoff, and the reason is
--    shown in the meters API (pgmeterState) and counted by
--    pgmeter_refresher_meters_failing. A successful merge clears all four.

ALTER TABLE meter_rollups
    ADD COLUMN failures       int         NOT NULL DEFAULT 0, -- consecutive failed merges
    ADD COLUMN failure_reason text,                           -- the last error, as Postgres gave it
    ADD COLUMN failing_since  timestamptz,                    -- the first failure of this run
    ADD COLUMN next_attempt   timestamptz;                    -- not claimed before this

DO $$
DECLARE
    r       record;
    lvl     text;
    tbl     regclass;
    keys    text;
    pk      name;
BEGIN
    FOR r IN SELECT meter_id, version, cardinality(group_keys) AS n FROM meter_rollups LOOP
        FOREACH lvl IN ARRAY ARRAY['m1', 'q15', 'd1', 'q15s', 'd1s', 'um1', 'uq15', 'ud1'] LOOP
            tbl := to_regclass(format('rollup.%I', lvl || '_' || lower(r.meter_id) || '_v' || r.version));
            CONTINUE WHEN tbl IS NULL;
            -- Same key as sql/templates (pgmeter.rollup.objects.unique_key).
            keys := '(md5(subject)::uuid), bucket';
            IF lvl NOT IN ('q15s', 'd1s') THEN
                FOR i IN 1 .. r.n LOOP
                    keys := keys || format(', (md5(%I)::uuid)', 'g' || i);
                END LOOP;
            END IF;
            IF lvl IN ('um1', 'uq15', 'ud1') THEN
                keys := keys || ', (md5(value)::uuid)';
            END IF;
            SELECT conname INTO pk FROM pg_constraint WHERE conrelid = tbl AND contype = 'p';
            IF pk IS NOT NULL THEN
                EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', tbl, pk);
            END IF;
            EXECUTE format('CREATE UNIQUE INDEX ON %s (%s)', tbl, keys);
        END LOOP;
    END LOOP;
END
$$;
