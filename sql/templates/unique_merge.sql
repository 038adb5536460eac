-- The UNIQUE_COUNT part of merge.sql: add the batch's distinct values to each
-- level's sets. A value already in a set is a no-op (ON CONFLICT DO NOTHING).
-- Placeholders: {um1} {uq15} {ud1} {group_key}.
, up_um1 AS (
    INSERT INTO {um1} (subject, bucket {group_key}, value)
    SELECT subject, bucket {group_key}, u
      FROM e
     WHERE u IS NOT NULL
     GROUP BY subject, bucket {group_key}, u
     ORDER BY subject, bucket {group_key}, u
    ON CONFLICT DO NOTHING
),
up_uq15 AS (
    INSERT INTO {uq15} (subject, bucket {group_key}, value)
    SELECT subject, date_bin('15 minutes', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key}, u
      FROM e
     WHERE u IS NOT NULL
     GROUP BY subject, b {group_key}, u
     ORDER BY subject, b {group_key}, u
    ON CONFLICT DO NOTHING
),
up_ud1 AS (
    INSERT INTO {ud1} (subject, bucket {group_key}, value)
    SELECT subject, date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key}, u
      FROM e
     WHERE u IS NOT NULL
     GROUP BY subject, b {group_key}, u
     ORDER BY subject, b {group_key}, u
    ON CONFLICT DO NOTHING
)
