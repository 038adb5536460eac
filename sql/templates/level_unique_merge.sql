-- One level's part of merge.sql for UNIQUE_COUNT: add the batch's distinct values to
-- the level's sets (um1, uq15, uh1, ud1, udz). A value already in a set is a no-op
-- (ON CONFLICT DO NOTHING). {bucket}, {zones}, {zone} and {zone_column} as in
-- level_merge.sql. Placeholders: {cte} {table} {zone_column} {zone} {zones} {bucket}
-- {group_key}.
, {cte} AS (
    INSERT INTO {table} ({zone_column}subject, bucket {group_key}, value)
    SELECT {zone}subject, {bucket} AS b {group_key}, u
      FROM e{zones}
     WHERE u IS NOT NULL
     GROUP BY {zone}subject, b {group_key}, u
     ORDER BY {zone}subject, b {group_key}, u
    ON CONFLICT DO NOTHING
)
