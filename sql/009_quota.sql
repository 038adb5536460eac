-- Real-time quota (src/pgmeter/quota) and the Lago webhook receiver (src/pgmeter/lago/webhooks.py).
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
