-- Fill one zone's day sets (udz) from the 15-minute sets (uq15); see zone_fill.sql.
-- Placeholders: {table} {source} {zone} {group_key}.
INSERT INTO {table} (zone, subject, bucket {group_key}, value)
SELECT DISTINCT {zone}, subject, date_trunc('day', bucket, {zone}) {group_key}, value
  FROM {source}
