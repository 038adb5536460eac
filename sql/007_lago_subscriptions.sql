-- Lago sync, subscription-aware (issue 12).
--
-- A window's usage is split at the instants its Lago subscriptions start and end,
-- so an outbox row now belongs to one window *piece*: (meter, code, subject, window,
-- Lago subscription record). Each piece keeps its own revisions; a revision whose
-- value is 1e12 or more goes as several parts, each its own Lago event.
--
-- Status 'refused': pgmeter decided not to send (no Lago subscription active for
-- that usage, a value a Lago store cannot hold); last_error says why.
ALTER TABLE lago_outbox
    ADD COLUMN lago_subscription_id text NOT NULL DEFAULT '',  -- '' when no subscription owned it
    ADD COLUMN part int NOT NULL DEFAULT 0;
ALTER TABLE lago_outbox DROP CONSTRAINT lago_outbox_meter_key_code_subject_window_start_revision_key;
ALTER TABLE lago_outbox ADD CONSTRAINT lago_outbox_piece_revision_part_key
    UNIQUE (meter_key, code, subject, window_start, lago_subscription_id, revision, part);
ALTER TABLE lago_outbox DROP CONSTRAINT lago_outbox_status_check;
ALTER TABLE lago_outbox ADD CONSTRAINT lago_outbox_status_check
    CHECK (status IN ('pending', 'sent', 'failed', 'refused'));
-- Late events and re-reads look up a subject's pieces by window.
DROP INDEX lago_outbox_window_idx;
CREATE INDEX lago_outbox_window_idx ON lago_outbox (meter_key, code, subject, window_start);

-- The sync state's horizon is now "usage read up to" (running totals of open
-- windows included), no longer "closed windows up to"; the column keeps its name.
COMMENT ON COLUMN lago_sync_state.closed_to IS 'usage was read up to this instant (now - lago.grace at that run)';

-- A mapping Lago's side cannot bill correctly (unknown or mismatched billable
-- metric) is not sent at all: its usage waits, and is sent once the metric is fixed.
CREATE TABLE lago_mapping_status (
    meter_key   text        NOT NULL,
    code        text        NOT NULL,
    refused     text,                    -- NULL when the last check passed
    checked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_key, code)
);

-- A piece of a window starts where its subscription starts: Lago compares event
-- timestamps with started_at to the millisecond, so the timestamp keeps milliseconds.
ALTER TABLE lago_outbox ALTER COLUMN timestamp TYPE numeric;
