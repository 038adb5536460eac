-- The meter catalog. Meters come from the config file and from the API; both land
-- here. Deleting a meter is a soft delete that frees its slug, as in OpenMeter.
CREATE TABLE meters (
    id             text        PRIMARY KEY,           -- ULID
    namespace      text        NOT NULL,
    slug           text        NOT NULL,
    name           text        NOT NULL,
    description    text,
    aggregation    text        NOT NULL CHECK (aggregation IN
                       ('SUM', 'COUNT', 'UNIQUE_COUNT', 'AVG', 'MIN', 'MAX', 'LATEST')),
    event_type     text        NOT NULL,
    event_from     timestamptz,
    value_property text,
    group_by       jsonb       NOT NULL DEFAULT '{}',  -- {key: jsonpath}
    metadata       jsonb,
    annotations    jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);

CREATE UNIQUE INDEX meters_active_slug_idx ON meters (namespace, slug) WHERE deleted_at IS NULL;
CREATE INDEX meters_event_type_idx ON meters (namespace, event_type) WHERE deleted_at IS NULL;
