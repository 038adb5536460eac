-- The plain view that presents one meter, for psql and Grafana:
--   SELECT * FROM meters.api_calls WHERE window_start >= now() - interval '1 hour'
-- One row per minute, subject and group values: the m1 rollup plus the events the
-- refresher has not merged yet, combined, so the view is never behind the sink.
-- Columns: window_start, window_end, subject, one column per group-by key (named
-- after the key), value. Values in DDL are literals quoted by psycopg.sql.
-- Placeholders: {view} {m1} {meter_id} {namespace} {event_type} {event_from_filter}
-- {group_values} {group_key} {group_columns_named} {event_values} {event_state}
-- {state_names} {final} {having}.
CREATE VIEW {view} AS
SELECT p.bucket AS window_start,
       p.bucket + interval '1 minute' AS window_end,
       p.subject
       {group_columns_named},
       {final} AS value
  FROM (
        SELECT subject, bucket {group_key}, cnt {state_names}
          FROM {m1}
        UNION ALL
        SELECT subject, bucket {group_key}, 1 AS cnt {event_state}
          FROM (SELECT subject,
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
                   {event_from_filter}) x
       ) p
 GROUP BY p.bucket, p.subject {group_key}
 {having}
