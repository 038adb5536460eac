-- Lago sync: what was sent, so nothing is billed twice or lost.
--
-- One row per Lago event pgmeter decided to send, written (status 'pending') before
-- the HTTP call with a deterministic transaction_id. A crash after Lago stored the
-- event but before we recorded it only means the next run sends the same id again;
-- Lago answers value_already_exist and the row becomes 'sent'.
CREATE TABLE lago_outbox (
    transaction_id           text        PRIMARY KEY,
    meter_key                text        NOT NULL,   -- '<namespace>/<slug>': survives a meter's re-creation
    code                     text        NOT NULL,
    subject                  text        NOT NULL,
    external_subscription_id text        NOT NULL,
    window_start             timestamptz NOT NULL,
    window_end               timestamptz NOT NULL,
    revision                 int         NOT NULL,   -- 0 first, then one per correction
    value                    numeric     NOT NULL,   -- what this Lago event carries
    window_value             numeric     NOT NULL,   -- the window's usage when it was computed
    timestamp                bigint      NOT NULL,   -- Lago timestamp (Unix seconds)
    property                 text        NOT NULL,   -- the Lago metric's field_name
    status                   text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'sent', 'failed')),
    attempts                 int         NOT NULL DEFAULT 0,
    last_error               text,
    created_at               timestamptz NOT NULL DEFAULT now(),
    sent_at                  timestamptz,
    UNIQUE (meter_key, code, subject, window_start, revision)
);
CREATE INDEX lago_outbox_pending_idx ON lago_outbox (created_at) WHERE status = 'pending';
CREATE INDEX lago_outbox_window_idx ON lago_outbox (meter_key, code, subject, window_start);

-- Per mapping: the closed-window horizon reached and the events seen, so each run
-- looks only at windows that closed since, plus windows that late events touched.
CREATE TABLE lago_sync_state (
    meter_key   text        NOT NULL,   -- '<namespace>/<slug>'
    code        text        NOT NULL,
    closed_to   timestamptz NOT NULL,   -- every window ending at or before this was considered
    seen_seq    bigint      NOT NULL,   -- events up to this seq were considered
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_key, code)
);
