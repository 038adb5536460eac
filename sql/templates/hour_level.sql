-- A meter's hourly level: a copy of the shape of its 15-minute one ({model}: q15,
-- q15s or uq15), same columns, unique key and bucket index. Placeholders: {table} {model}.
CREATE TABLE {table} (LIKE {model} INCLUDING ALL) WITH (fillfactor = 90);
