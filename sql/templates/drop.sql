-- Drop one version of a meter's objects (meter deleted, or rebuilt after its
-- group-by changed). IF EXISTS: not every meter has sets or subject levels.
-- Placeholders: {view} {m1} {q15} {d1} {q15s} {d1s} {um1} {uq15} {ud1} {h1} {h1s} {uh1} {dz} {dzs} {udz}.
DROP VIEW IF EXISTS {view};
DROP TABLE IF EXISTS {m1}, {q15}, {d1}, {q15s}, {d1s}, {um1}, {uq15}, {ud1}, {h1}, {h1s}, {uh1}, {dz}, {dzs}, {udz};
