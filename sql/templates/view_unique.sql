-- The view of a UNIQUE_COUNT meter (see view.sql): per minute key, the number of
-- distinct values in the m1 sets and the unmerged events together; 0 for keys
-- whose events carry no countable value.
-- Placeholders: {view} {m1} {um1} {meter_id} {namespace} {event_type}
-- {event_from_filter} {group_values} {group_key} {group_columns_named} {event_values}.
CREATE VIEW {view} AS
WITH tail AS (
    SELECT subject,
           date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket
           {group_values}
           {event_values}
      FROM events
     WHERE seq > (SELECT last_seq FROM meter_rollups WHERE meter_id = {meter_id})
       AND namespace = {namespace} AND type = {event_type}
       -- the least time of the unmerged events (pgmeter.rollup.floor): prunes partitions
       AND time >= (SELECT min(f.min_time) FROM event_floor f
                    WHERE f.hi_seq > (SELECT last_seq FROM meter_rollups WHERE meter_id = {meter_id})
                      AND ((f.namespace = {namespace} AND f.type = {event_type}) OR f.namespace IS NULL))
       {event_from_filter}
),
keys AS (
    SELECT subject, bucket {group_key} FROM {m1}
    UNION
    SELECT subject, bucket {group_key} FROM tail
),
sets AS (
    SELECT subject, bucket {group_key}, count(DISTINCT value) AS n
      FROM (SELECT subject, bucket {group_key}, value FROM {um1}
            UNION ALL
            SELECT subject, bucket {group_key}, u FROM tail WHERE u IS NOT NULL) v
     GROUP BY subject, bucket {group_key}
)
SELECT p.bucket AS window_start,
       p.bucket + interval '1 minute' AS window_end,
       p.subject
       {group_columns_named},
       coalesce(s.n, 0) AS value
  FROM keys p
  LEFT JOIN sets s USING (subject, bucket {group_key})
