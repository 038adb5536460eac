-- Placeholder: number 006 belongs to another branch of this wave (the sink's
-- migration). It exists here only so that 007 applies in this branch (the runner
-- requires numbers without gaps); drop this file when merging that branch.
SELECT 1;
