-- Consumer portal tokens (OpenMeter's /api/v1/portal/tokens).
--
-- The token itself is a signed JWT and is never stored; this table keeps what the
-- list and invalidate routes need. A token whose row is missing or invalidated is
-- refused even though its signature and expiry are good.
CREATE TABLE portal_tokens (
    namespace           text        NOT NULL,
    id                  uuid        NOT NULL,
    subject             text        NOT NULL,
    allowed_meter_slugs text[],
    expires_at          timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    invalidated_at      timestamptz,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX portal_tokens_subject ON portal_tokens (namespace, subject);
CREATE INDEX portal_tokens_created ON portal_tokens (namespace, created_at DESC);
