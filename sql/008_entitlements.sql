-- Customers, features, entitlements, grants and balance snapshots: OpenMeter's
-- usage-limit model (src/pgmeter/entitlements). Everything is per namespace; ids
-- are ULIDs. Deletes are soft, as in OpenMeter: values for earlier times stay
-- computable after a delete, void or archive.

CREATE TABLE customers (
    id              text        PRIMARY KEY,
    namespace       text        NOT NULL,
    key             text,
    name            text        NOT NULL,
    description     text,
    primary_email   text,
    currency        text,
    billing_address jsonb,
    metadata        jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
-- A key names one live customer (deleted customers free it).
CREATE UNIQUE INDEX customers_live_key_idx ON customers (namespace, key) WHERE deleted_at IS NULL;

-- usageAttribution.subjectKeys. A subject belongs to at most one live customer;
-- removing a key from a customer soft-deletes its row.
CREATE TABLE customer_subjects (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace   text        NOT NULL,
    customer_id text        NOT NULL REFERENCES customers (id),
    subject_key text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);
CREATE UNIQUE INDEX customer_subjects_live_idx ON customer_subjects (namespace, subject_key)
    WHERE deleted_at IS NULL;
CREATE INDEX customer_subjects_customer_idx ON customer_subjects (customer_id);

-- The deprecated Subject entity (/api/v1/subjects): metadata about an event subject.
CREATE TABLE subjects (
    id                 text        PRIMARY KEY,
    namespace          text        NOT NULL,
    key                text        NOT NULL,
    display_name       text,
    metadata           jsonb,
    stripe_customer_id text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    deleted_at         timestamptz
);
CREATE UNIQUE INDEX subjects_live_key_idx ON subjects (namespace, key) WHERE deleted_at IS NULL;

CREATE TABLE features (
    id             text        PRIMARY KEY,
    namespace      text        NOT NULL,
    key            text        NOT NULL,
    name           text        NOT NULL,
    meter_slug     text,
    meter_id       text        REFERENCES meters (id),
    -- {groupByKey: value}: equality filters on the meter's group-by values.
    filters        jsonb,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    archived_at    timestamptz
);
CREATE UNIQUE INDEX features_live_key_idx ON features (namespace, key) WHERE archived_at IS NULL;
CREATE INDEX features_meter_idx ON features (meter_id) WHERE archived_at IS NULL;

CREATE TABLE entitlements (
    id                         text        PRIMARY KEY,
    namespace                  text        NOT NULL,
    customer_id                text        NOT NULL REFERENCES customers (id),
    feature_id                 text        NOT NULL REFERENCES features (id),
    feature_key                text        NOT NULL,
    type                       text        NOT NULL CHECK (type IN ('metered', 'boolean', 'static')),
    -- metered
    measure_usage_from         timestamptz,
    is_soft_limit              boolean     NOT NULL DEFAULT false,
    issue_after_reset          numeric,
    issue_after_reset_priority int,
    preserve_overage_at_reset  boolean     NOT NULL DEFAULT false,
    -- usagePeriod: interval as given (DAY, MONTH, P2W...) and its anchor
    usage_interval             text,
    usage_anchor               timestamptz,
    -- static
    config                     text,
    metadata                   jsonb,
    annotations                jsonb,
    active_from                timestamptz NOT NULL,
    active_to                  timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    deleted_at                 timestamptz
);
CREATE INDEX entitlements_customer_idx ON entitlements (namespace, customer_id, feature_key);
CREATE INDEX entitlements_feature_idx ON entitlements (feature_id);

CREATE TABLE grants (
    id                  text        PRIMARY KEY,
    namespace           text        NOT NULL,
    entitlement_id      text        NOT NULL REFERENCES entitlements (id),
    amount              numeric     NOT NULL,
    priority            int         NOT NULL DEFAULT 0,
    effective_at        timestamptz NOT NULL,
    -- expiration as given ({duration, count}) and the instant it yields
    expiration_duration text,
    expiration_count    int,
    expires_at          timestamptz,
    min_rollover        numeric     NOT NULL DEFAULT 0,
    max_rollover        numeric     NOT NULL DEFAULT 0,
    recurrence_interval text,
    recurrence_anchor   timestamptz,
    metadata            jsonb,
    annotations         jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz,
    voided_at           timestamptz
);
CREATE INDEX grants_entitlement_idx ON grants (entitlement_id);

-- Explicit resets (POST .../reset). Period boundaries are computed, never stored.
CREATE TABLE usage_resets (
    id             text        PRIMARY KEY,
    entitlement_id text        NOT NULL REFERENCES entitlements (id),
    reset_time     timestamptz NOT NULL,
    anchor         timestamptz NOT NULL,
    usage_interval text        NOT NULL,
    -- whether this reset kept the overage (the request's preserveOverage, else the entitlement's)
    preserve_overage boolean   NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_resets_entitlement_idx ON usage_resets (entitlement_id, reset_time);

-- The engine's state at an instant, so a value read resumes from the newest valid
-- one instead of replaying history. ``epoch`` is the cache epoch of the meter's
-- event type when the state was computed and ``checksum`` the usage from
-- measureUsageFrom to ``at`` it saw: a late event bumps the epoch, and a snapshot
-- whose checksum no longer matches the usage is one the event crossed.
CREATE TABLE balance_snapshots (
    entitlement_id    text        NOT NULL REFERENCES entitlements (id),
    at                timestamptz NOT NULL,
    balances          jsonb       NOT NULL,   -- {grantId: balance}
    overage           numeric     NOT NULL,
    usage             numeric     NOT NULL,   -- usage of the period up to ``at``
    total_grant_usage numeric     NOT NULL,
    checksum          numeric     NOT NULL,
    epoch             bigint      NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entitlement_id, at)
);
