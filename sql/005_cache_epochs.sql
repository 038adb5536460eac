-- The query cache's invalidation: one counter per (namespace, event type).
--
-- The sink bumps it in the same transaction that commits an event dated before
-- the cache's settle horizon (a late event), and partition retention bumps every
-- counter it affects. Cached answers carry the counter in their key, so a late
-- event turns every cached answer that could include it into a miss.
CREATE TABLE cache_epochs (
    namespace  text   NOT NULL,
    event_type text   NOT NULL,
    epoch      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, event_type)
);
