-- Merge the events with {lo} < seq <= {hi} into one meter's levels, in one
-- statement (the caller commits it together with the meter's new last_seq).
-- {time_floor} is the least time of those events (pgmeter.rollup.floor): it adds
-- nothing to the filter but lets Postgres prune the partitions before it.
--
-- x reads each event once and extracts its values in Postgres (jsonb operators,
-- paths as bind parameters); e turns them into per-event state; m1 combines the
-- state per minute key; the coarse levels combine the m1 rows. Every upsert feeds
-- its keys in subject and bucket order and names its unique index by {key}
-- ("(md5(subject)::uuid), bucket, (md5(g1)::uuid), ...", see rollup_tables.sql).
-- Per-aggregation fragments come from pgmeter/rollup/states.py: {event_values} {event_state} {combine} {merge}
-- {state_names}; the key fragments {group_values} (", pgmeter_group_value(...) AS g1")
-- and {group_key} (", g1, ..."). {level_ctes} holds one level_merge.sql per coarse
-- level (q15, h1, d1, their subject-only copies, the zones' local days) and one
-- level_unique_merge.sql per set level of a UNIQUE_COUNT meter.
WITH x AS (
    SELECT subject COLLATE "C" AS subject,
           date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket
           {group_values}
           {event_values}
      FROM events
     WHERE seq > {lo} AND seq <= {hi}
       AND namespace = {namespace} AND type = {event_type}
       AND time >= {time_floor}
       {event_from_filter}
),
e AS (
    SELECT subject, bucket {group_key}, 1 AS cnt {event_state} {unique_value}
      FROM x
),
m1 AS (
    SELECT subject, bucket {group_key}, sum(cnt)::bigint AS cnt {combine}
      FROM e
     GROUP BY subject, bucket {group_key}
),
up_m1 AS (
    INSERT INTO {m1} AS r (subject, bucket {group_key}, cnt {state_names})
    SELECT subject, bucket {group_key}, cnt {state_names}
      FROM m1
     ORDER BY subject, bucket {group_key}
    ON CONFLICT ({key}) DO UPDATE
       SET cnt = r.cnt + excluded.cnt {merge}
)
{level_ctes}
SELECT coalesce(sum(cnt), 0)::bigint AS events FROM m1
