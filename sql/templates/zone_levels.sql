-- A day level of the meter's zones (dz, dzs or udz): the shape of its UTC-day model
-- (d1, d1s or ud1) with the zone in front. A bucket is the instant a local day
-- starts in that zone, so DST days (23 or 25 hours) and half-hour zones are one row
-- per day and key. The refresher creates these when it first adds a zone to the
-- meter (pgmeter.rollup.day_zones); the unique index is the model's with the zone
-- first. Placeholders: {table} {model} {key}.
CREATE TABLE {table} (zone text COLLATE "C" NOT NULL, LIKE {model}) WITH (fillfactor = 90);
CREATE UNIQUE INDEX ON {table} (zone, {key});
CREATE INDEX ON {table} (zone, bucket);
