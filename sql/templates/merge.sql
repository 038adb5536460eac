-- Merge the events with {lo} < seq <= {hi} into one meter's three levels, in one
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
-- and {group_key} (", g1, ..."); {subject_ctes} is subject_merge.sql (meters with
-- group-by keys) or nothing, {unique_ctes} is unique_merge.sql or nothing, {hour_ctes}
-- the hourly levels' (hour_*merge.sql) or nothing.
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
),
up_q15 AS (
    INSERT INTO {q15} AS r (subject, bucket {group_key}, cnt {state_names}, t_min, t_max)
    SELECT subject, date_bin('15 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key},
           sum(cnt)::bigint {combine}, min(bucket), max(bucket)
      FROM m1
     GROUP BY subject, b {group_key}
     ORDER BY subject, b {group_key}
    ON CONFLICT ({key}) DO UPDATE
       SET cnt = r.cnt + excluded.cnt,
           t_min = least(r.t_min, excluded.t_min),
           t_max = greatest(r.t_max, excluded.t_max) {merge}
),
up_d1 AS (
    INSERT INTO {d1} AS r (subject, bucket {group_key}, cnt {state_names}, t_min, t_max)
    SELECT subject, date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key},
           sum(cnt)::bigint {combine}, min(bucket), max(bucket)
      FROM m1
     GROUP BY subject, b {group_key}
     ORDER BY subject, b {group_key}
    ON CONFLICT ({key}) DO UPDATE
       SET cnt = r.cnt + excluded.cnt,
           t_min = least(r.t_min, excluded.t_min),
           t_max = greatest(r.t_max, excluded.t_max) {merge}
)
{hour_ctes}
{subject_ctes}
{unique_ctes}
SELECT coalesce(sum(cnt), 0)::bigint AS events FROM m1
