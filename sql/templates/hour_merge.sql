-- The hourly level's part of merge.sql (meters with hourly = true): the batch's m1
-- rows combined per hour. Placeholders: {h1} {key} {group_key} {combine} {state_names} {merge}.
, up_h1 AS (
    INSERT INTO {h1} AS r (subject, bucket {group_key}, cnt {state_names}, t_min, t_max)
    SELECT subject, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key},
           sum(cnt)::bigint {combine}, min(bucket), max(bucket)
      FROM m1
     GROUP BY subject, b {group_key}
     ORDER BY subject, b {group_key}
    ON CONFLICT ({key}) DO UPDATE
       SET cnt = r.cnt + excluded.cnt,
           t_min = least(r.t_min, excluded.t_min),
           t_max = greatest(r.t_max, excluded.t_max) {merge}
)
