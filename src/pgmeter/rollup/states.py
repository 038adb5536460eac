"""What each aggregation keeps per rollup key, and how that state combines.

One table of SQL fragments per aggregation, used by every statement that touches
rollup state: the merge (sql/templates/merge.sql), the per-meter views and the
query engine. Keeping them in one place is what makes a rollup row, a raw event
and the query agree. Every row, rolled up or raw, has ``cnt`` (events of the
meter's type, valid value or not) plus the columns below; a raw event enters as a
row of its own with ``cnt = 1``.

- SUM: ``s_sum`` (numeric, NULL while no valid value was seen)
- AVG: ``s_sum`` and ``s_n`` (valid values): the mean is ``sum / n`` at read time,
  never an average of averages
- MIN / MAX: ``s_min`` / ``s_max``
- LATEST: ``(l_time, l_seq, l_val)`` of the valid event with the greatest time
  (whole seconds), ties broken by the greater seq, so a late older event never wins
- COUNT and UNIQUE_COUNT: ``cnt`` only (UNIQUE_COUNT's values live in set tables)
"""

from __future__ import annotations

from dataclasses import dataclass

from pgmeter.meters.model import Aggregation


@dataclass(frozen=True)
class State:
    # (name, type) of the state columns, after cnt.
    columns: tuple[tuple[str, str], ...]
    # Per-event state, from the extracted event columns v (number), t (time at
    # whole seconds) and seq: one expression per column, in order.
    from_event: tuple[str, ...]
    # Aggregates that combine rows of state (events or finer rollup rows) into one.
    combine: tuple[str, ...]
    # ON CONFLICT ... SET expressions: stored row r merged with the incoming one.
    merge: tuple[str, ...]
    # The reported value, as an aggregate over rows of state.
    final: str
    # Whether a key whose events carry no valid value is reported (COUNT and
    # UNIQUE_COUNT report every key with events; the others omit a NULL result).
    reports_empty: bool
    # Which extracted event columns the state needs: v, and t + seq for LATEST.
    needs_number: bool
    needs_time: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)


# LATEST orders by (time, seq), newest first, among rows that have a valid value.
_LATEST_ORDER = "ORDER BY l_time DESC, l_seq DESC) FILTER (WHERE l_time IS NOT NULL))[1]"
# The incoming LATEST tuple wins when the stored one is empty or older.
_LATEST_WINS = ("(r.l_time IS NULL OR (excluded.l_time IS NOT NULL "
                "AND (excluded.l_time, excluded.l_seq) > (r.l_time, r.l_seq)))")

STATES: dict[Aggregation, State] = {
    Aggregation.COUNT: State(
        columns=(), from_event=(), combine=(), merge=(), final="sum(cnt)",
        reports_empty=True, needs_number=False, needs_time=False,
    ),
    Aggregation.UNIQUE_COUNT: State(
        # The value comes from the sets; cnt keeps keys with only invalid values.
        columns=(), from_event=(), combine=(), merge=(), final="sum(cnt)",
        reports_empty=True, needs_number=False, needs_time=False,
    ),
    Aggregation.SUM: State(
        columns=(("s_sum", "numeric"),),
        from_event=("v",),
        combine=("sum(s_sum)",),
        # NULL + x is NULL; coalesce keeps whichever side has seen a value.
        merge=("coalesce(r.s_sum + excluded.s_sum, r.s_sum, excluded.s_sum)",),
        final="sum(s_sum)",
        reports_empty=False, needs_number=True, needs_time=False,
    ),
    Aggregation.AVG: State(
        columns=(("s_sum", "numeric"), ("s_n", "bigint")),
        from_event=("v", "(v IS NOT NULL)::int"),
        combine=("sum(s_sum)", "sum(s_n)::bigint"),
        merge=("coalesce(r.s_sum + excluded.s_sum, r.s_sum, excluded.s_sum)", "r.s_n + excluded.s_n"),
        final="sum(s_sum) / nullif(sum(s_n), 0)",
        reports_empty=False, needs_number=True, needs_time=False,
    ),
    Aggregation.MIN: State(
        columns=(("s_min", "numeric"),),
        from_event=("v",),
        combine=("min(s_min)",),
        merge=("least(r.s_min, excluded.s_min)",),  # least() ignores NULLs
        final="min(s_min)",
        reports_empty=False, needs_number=True, needs_time=False,
    ),
    Aggregation.MAX: State(
        columns=(("s_max", "numeric"),),
        from_event=("v",),
        combine=("max(s_max)",),
        merge=("greatest(r.s_max, excluded.s_max)",),
        final="max(s_max)",
        reports_empty=False, needs_number=True, needs_time=False,
    ),
    Aggregation.LATEST: State(
        columns=(("l_time", "timestamptz"), ("l_seq", "bigint"), ("l_val", "numeric")),
        from_event=("CASE WHEN v IS NOT NULL THEN t END",
                    "CASE WHEN v IS NOT NULL THEN seq END",
                    "v"),
        combine=("max(l_time)",
                 "(array_agg(l_seq " + _LATEST_ORDER,
                 "(array_agg(l_val " + _LATEST_ORDER),
        merge=(f"CASE WHEN {_LATEST_WINS} THEN excluded.l_time ELSE r.l_time END",
               f"CASE WHEN {_LATEST_WINS} THEN excluded.l_seq ELSE r.l_seq END",
               f"CASE WHEN {_LATEST_WINS} THEN excluded.l_val ELSE r.l_val END"),
        final="(array_agg(l_val " + _LATEST_ORDER,
        reports_empty=False, needs_number=True, needs_time=True,
    ),
}


def state_for(aggregation: Aggregation | str) -> State:
    return STATES[Aggregation(aggregation)]
