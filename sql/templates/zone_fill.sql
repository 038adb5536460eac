-- Fill one zone's day level (dz or dzs) from the meter's 15-minute level ({source}:
-- q15 or q15s), when the refresher adds the zone to a meter that has merged events
-- already. Exact for every local day whose boundaries lie on the 15-minute grid (all
-- zones since ~1980); the query planner uses these rows only over such ranges.
-- Placeholders: {table} {source} {zone} (a bind parameter) {group_key} {combine} {state_names}.
INSERT INTO {table} (zone, subject, bucket {group_key}, cnt {state_names}, t_min, t_max)
SELECT {zone}, subject, date_trunc('day', bucket, {zone}) AS b {group_key},
       sum(cnt)::bigint {combine}, min(t_min), max(t_max)
  FROM {source}
 GROUP BY subject, b {group_key}
