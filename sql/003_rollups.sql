-- Meters as incrementally refreshed rollups.
--
-- Every meter owns a set of rollup tables (schema "rollup", created from
-- sql/templates/ when the meter is created) and a view presenting them (schema
-- "meters", named after the slug). This file holds what they all share: the
-- progress row per meter and the functions that read event values by OpenMeter's
-- rules, so the refresher, the query tail and the views agree on every value.

CREATE SCHEMA rollup;   -- per-meter rollup tables: internal, named by meter id and version
CREATE SCHEMA meters;   -- per-meter views: SELECT * FROM meters.api_calls

-- One row per active meter: the definition its rollup was built for and how far it
-- has merged. The refresher locks the row (FOR UPDATE SKIP LOCKED) while it merges
-- a batch, and moves last_seq in the same transaction as the rollup upsert, so a
-- batch is merged exactly once. The definition is copied here, not read from
-- "meters", so a refresher always merges with the definition the tables were
-- built for, even while an update of the meter commits concurrently.
CREATE TABLE meter_rollups (
    meter_id      text        PRIMARY KEY REFERENCES meters (id),
    version       int         NOT NULL,           -- part of the object names; bumps on rebuild
    namespace     text        NOT NULL,
    event_type    text        NOT NULL,
    aggregation   text        NOT NULL,
    event_from    timestamptz,
    value_path    text[],                         -- jsonb path of valueProperty (NULL for COUNT)
    group_keys    text[]      NOT NULL,           -- rollup column g<i> holds group_keys[i]
    group_paths   jsonb       NOT NULL,           -- [[step, ...], ...], parallel to group_keys
    view_name     text        NOT NULL,           -- in schema "meters"
    last_seq      bigint      NOT NULL DEFAULT 0, -- every event with seq <= last_seq is merged
    built_at_seq  bigint      NOT NULL DEFAULT 0, -- the head when the objects were built (backfill target)
    merged_at     timestamptz,                    -- last merge, for round-robin claiming
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- The number at a value property, by OpenMeter's rules: a JSON number, or a string
-- that reads as a decimal float ("100", "0.456", "1e3"). NULL (skipped) for
-- anything else: missing, JSON null, bool, object, array, non-numeric strings,
-- "NaN" and "Inf" (they are not decimal literals), and magnitudes beyond float64
-- (OpenMeter reads them as +-Inf and skips them). The length and exponent limits
-- keep the numeric cast from ever raising, so one odd event cannot stall a meter.
-- Plain SQL with one expression, so the planner inlines it.
CREATE FUNCTION pgmeter_number(v jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(v)
        WHEN 'number' THEN
            CASE WHEN abs(v::numeric) <= 1.7976931348623157e308 THEN v::numeric END
        WHEN 'string' THEN
            -- Nested CASEs, not AND: only CASE fixes the order of evaluation, and the
            -- cast must not run before the pattern has matched.
            CASE WHEN length(v #>> '{}') <= 1000
                      AND (v #>> '{}') ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$' THEN
                CASE WHEN abs((v #>> '{}')::numeric) <= 1.7976931348623157e308 THEN (v #>> '{}')::numeric END
            END
    END
$$;

-- A group-by value: the scalar at the path as text (numbers as jsonb prints them,
-- booleans as true/false). A missing path, JSON null, an object or an array give
-- '' (OpenMeter's rule), never NULL, so rollup keys need no NULL handling.
CREATE FUNCTION pgmeter_group_value(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IN ('string', 'number', 'boolean') THEN v #>> '{}' ELSE '' END
$$;

-- A UNIQUE_COUNT value: the scalar as text (number 1 and string "1" are the same
-- value). JSON null is excluded as OpenMeter does; a missing path, an object or an
-- array are excluded too (OpenMeter counts a missing value as ''; its own docs
-- recommend excluding it).
CREATE FUNCTION pgmeter_unique_value(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IN ('string', 'number', 'boolean') THEN v #>> '{}' END
$$;
