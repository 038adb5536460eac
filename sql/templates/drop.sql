-- Drop one version of a meter's objects (meter deleted, or rebuilt after its
-- group-by changed). IF EXISTS: a meter without UNIQUE_COUNT has no sets.
-- Placeholders: {view} {m1} {q15} {d1} {um1} {uq15} {ud1}.
DROP VIEW IF EXISTS {view};
DROP TABLE IF EXISTS {m1}, {q15}, {d1}, {um1}, {uq15}, {ud1};
