-- The subject-only hourly level's part of merge.sql. Placeholders: {h1s} {combine}
-- {state_names} {merge}.
, up_h1s AS (
    INSERT INTO {h1s} AS r (subject, bucket, cnt {state_names}, t_min, t_max)
    SELECT subject, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b,
           sum(cnt)::bigint {combine}, min(bucket), max(bucket)
      FROM m1
     GROUP BY subject, b
     ORDER BY subject, b
    ON CONFLICT ((md5(subject)::uuid), bucket) DO UPDATE
       SET cnt = r.cnt + excluded.cnt,
           t_min = least(r.t_min, excluded.t_min),
           t_max = greatest(r.t_max, excluded.t_max) {merge}
)
