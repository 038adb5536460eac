-- One coarse level's part of merge.sql: the batch's m1 rows combined per coarser
-- bucket and upserted. One template for every coarse level: q15, h1 and d1 (and their
-- subject-only copies q15s, h1s, d1s) differ only in {bucket}, a date_bin to their
-- grain; the day levels of the meter's zones (dz, dzs) bucket by local day,
-- date_trunc('day', bucket, z.zone), one row per zone: {zones} is the CROSS JOIN
-- over the meter's zones (a bind parameter), {zone} "z.zone, " and {zone_column}
-- "zone, " (all three empty for UTC-grid levels). A minute bucket lies wholly inside
-- one local day in every zone whose offset is whole minutes, DST days of 23 or 25
-- hours included.
-- Placeholders: {cte} {table} {zone_column} {zone} {zones} {bucket} {key} {group_key}
-- {combine} {state_names} {merge}.
, {cte} AS (
    INSERT INTO {table} AS r ({zone_column}subject, bucket {group_key}, cnt {state_names}, t_min, t_max)
    SELECT {zone}subject, {bucket} AS b {group_key},
           sum(cnt)::bigint {combine}, min(bucket), max(bucket)
      FROM m1{zones}
     GROUP BY {zone}subject, b {group_key}
     ORDER BY {zone}subject, b {group_key}
    ON CONFLICT ({key}) DO UPDATE
       SET cnt = r.cnt + excluded.cnt,
           t_min = least(r.t_min, excluded.t_min),
           t_max = greatest(r.t_max, excluded.t_max) {merge}
)
