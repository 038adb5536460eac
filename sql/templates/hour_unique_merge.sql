-- The hourly UNIQUE_COUNT set's part of merge.sql. Placeholders: {uh1} {group_key}.
, up_uh1 AS (
    INSERT INTO {uh1} (subject, bucket {group_key}, value)
    SELECT subject, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b {group_key}, u
      FROM e
     WHERE u IS NOT NULL
     GROUP BY subject, b {group_key}, u
     ORDER BY subject, b {group_key}, u
    ON CONFLICT DO NOTHING
)
