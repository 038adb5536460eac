-- Real-time quota (src/pgmeter/quota) and the Lago webhook receiver (src/pgmeter/credits/webhooks.py).
-- (Numbered 009 here only because migrations must be gapless; the brief reserves 020+ for this
-- branch, so the lead renumbers it at merge.)

-- Whatever changes a balance other than new events (grants, voids, resets, an entitlement
-- deleted or a customer's subjects changed) tells the quota worker which entitlement to
-- recompute, in the same transaction, so the notice is delivered exactly when the change
-- is visible. The worker's periodic rebuild covers notices lost while it was away.
CREATE FUNCTION pgmeter_quota_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'customers' THEN
        PERFORM pg_notify('pgmeter_quota', 'customer:' || NEW.id);
    ELSIF TG_TABLE_NAME = 'customer_subjects' THEN
        PERFORM pg_notify('pgmeter_quota', 'customer:' || NEW.customer_id);
    ELSIF TG_TABLE_NAME = 'entitlements' THEN
        PERFORM pg_notify('pgmeter_quota', 'entitlement:' || NEW.id);
    ELSE
        PERFORM pg_notify('pgmeter_quota', 'entitlement:' || NEW.entitlement_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER quota_grants AFTER INSERT OR UPDATE ON grants
    FOR EACH ROW EXECUTE FUNCTION pgmeter_quota_notify();
CREATE TRIGGER quota_resets AFTER INSERT OR UPDATE ON usage_resets
    FOR EACH ROW EXECUTE FUNCTION pgmeter_quota_notify();
-- An explicit reset also tells the notification rules (entitlements.reset) which one it was.
CREATE FUNCTION pgmeter_reset_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgmeter_quota', 'reset:' || NEW.entitlement_id || ':' || NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER quota_reset_events AFTER INSERT ON usage_resets
    FOR EACH ROW EXECUTE FUNCTION pgmeter_reset_notify();
CREATE TRIGGER quota_entitlements AFTER INSERT OR UPDATE ON entitlements
    FOR EACH ROW EXECUTE FUNCTION pgmeter_quota_notify();
CREATE TRIGGER quota_customers AFTER UPDATE ON customers
    FOR EACH ROW EXECUTE FUNCTION pgmeter_quota_notify();
CREATE TRIGGER quota_customer_subjects AFTER INSERT OR UPDATE ON customer_subjects
    FOR EACH ROW EXECUTE FUNCTION pgmeter_quota_notify();

-- Lago webhooks already applied, by X-Lago-Unique-Key: a redelivery or a replay is
-- answered 200 and changes nothing. ``grant_id`` is the grant a settled credit became.
CREATE TABLE lago_webhooks (
    namespace   text        NOT NULL,
    unique_key  text        NOT NULL,
    webhook_type text       NOT NULL,
    object_id   text,
    grant_id    text,
    outcome     text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, unique_key)
);
-- One grant per settled wallet transaction, whichever webhook (created or updated) brings it.
CREATE UNIQUE INDEX lago_webhooks_object_idx ON lago_webhooks (namespace, object_id) WHERE grant_id IS NOT NULL;

-- Notifications (src/pgmeter/notify): OpenMeter's channels, rules and events.
CREATE TABLE notification_channels (
    id             text        PRIMARY KEY,
    namespace      text        NOT NULL,
    type           text        NOT NULL CHECK (type = 'WEBHOOK'),
    name           text        NOT NULL,
    url            text        NOT NULL,
    disabled       boolean     NOT NULL DEFAULT false,
    custom_headers jsonb,
    signing_secret text        NOT NULL,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);
CREATE INDEX notification_channels_ns_idx ON notification_channels (namespace, created_at);

CREATE TABLE notification_rules (
    id         text        PRIMARY KEY,
    namespace  text        NOT NULL,
    type       text        NOT NULL CHECK (type IN ('entitlements.balance.threshold', 'entitlements.reset')),
    name       text        NOT NULL,
    disabled   boolean     NOT NULL DEFAULT false,
    channels   text[]      NOT NULL,
    features   text[]      NOT NULL DEFAULT '{}',   -- feature ids; empty: every feature
    thresholds jsonb,                               -- [{type, value}] (threshold rules)
    metadata   jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);
CREATE INDEX notification_rules_ns_idx ON notification_rules (namespace, created_at);

-- One row per fired notification. ``dedupe`` keys "once per period": (rule, kind,
-- entitlement, period) for thresholds, the reset's id for resets.
CREATE TABLE notification_events (
    id          text        PRIMARY KEY,
    namespace   text        NOT NULL,
    type        text        NOT NULL,
    rule_id     text        NOT NULL REFERENCES notification_rules (id),
    entitlement_id text     NOT NULL,
    subject     text,
    feature_id  text,
    dedupe      text        NOT NULL,
    threshold   jsonb,
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_events_dedupe_idx ON notification_events (namespace, dedupe, created_at DESC);
CREATE INDEX notification_events_ns_idx ON notification_events (namespace, created_at DESC);

-- The outbox: one delivery per (event, channel), retried with backoff until a 2xx or
-- the schedule runs out (notifications.retrySchedule).
CREATE TABLE notification_deliveries (
    event_id        text        NOT NULL REFERENCES notification_events (id),
    channel_id      text        NOT NULL REFERENCES notification_channels (id),
    state           text        NOT NULL DEFAULT 'PENDING'
                                CHECK (state IN ('PENDING', 'SENDING', 'SUCCESS', 'FAILED', 'RESENDING')),
    reason          text,
    attempt_count   int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    attempts        jsonb       NOT NULL DEFAULT '[]',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, channel_id)
);
CREATE INDEX notification_deliveries_due_idx ON notification_deliveries (next_attempt_at)
    WHERE state IN ('PENDING', 'RESENDING');
