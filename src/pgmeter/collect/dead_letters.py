"""``pgmeter collect dead-letters list|replay``: what a pipeline could not deliver, and
putting it back after a fix.

Two kinds of dead letter, and what a replay does with each:

- refused by the **mapping** (or by validation after it): the letter keeps the source
  record and its deterministic id, so a replay maps the record again with the
  pipeline's *current* mapping - fix the jq program, replay, and the events carry the
  very ids they would have had the first time (``<id>``, ``<id>-1``...). Events of the
  same record that were delivered the first time are sent again and deduplicated by
  the endpoint, so a replay never counts twice. An event without ``time`` gets the
  moment the letter was written (the record's collection), not the replay's.
- refused by the **endpoint** (400/413, after raising a limit or creating a meter, say):
  the event is queued again exactly as it was, same id.

What still fails is dead-lettered again with its new reason (in the same transaction
that removes the old letter); what cannot be taken at all (a file line that is not
JSON) stays as it is. The command writes the buffer file while the collector runs
(SQLite takes writers from several processes; the collector notices and delivers
within a second), or while it is stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pgmeter.collect.buffer import Buffer
from pgmeter.collect.mapping import Mapped, Mapping, rfc3339


@dataclass
class Replayed:
    letters: int = 0  # dead letters taken back
    events: int = 0  # events queued for delivery
    still_dead: list[tuple[int, str]] = field(default_factory=list)  # (old seq, new reason)
    kept: list[tuple[int, str]] = field(default_factory=list)  # (seq, why it cannot be replayed)
    missing: list[int] = field(default_factory=list)  # --id values with no letter


def listing(buffer: Buffer, pipeline: str, seqs: list[int] | None = None) -> Iterator[str]:
    """One JSON object per dead letter, oldest first (for a terminal, or for jq)."""
    for letter in buffer.dead_letters(seqs):
        yield json.dumps({"pipeline": pipeline, "seq": letter["seq"], "at": rfc3339(int(letter["at"] * 1_000_000)),
                          "reason": letter["reason"], "detail": letter["detail"], "payload": letter["payload"],
                          "replay": "map the record again" if letter["record"] is not None else "send as is"},
                         ensure_ascii=False)


def replay(buffer: Buffer, mapping: Mapping, seqs: list[int] | None = None) -> Replayed:
    """Put dead letters (all, or ``seqs``) back in the queue; see the module docstring."""
    letters = buffer.dead_letters(seqs)
    out = Replayed(missing=sorted(set(seqs or []) - {letter["seq"] for letter in letters}))
    # The letters of one record (several of its events failed) are mapped again once.
    by_record: dict[str, list[dict[str, Any]]] = {}
    for letter in letters:
        if letter["record"] is not None:
            by_record.setdefault(letter["recordId"], []).append(letter)
    as_is = Mapping(None, mapping.source, mapping.limits)  # validation only, no program
    for letter in letters:
        collected = int(letter["at"] * 1_000_000)
        group = [letter]
        if letter["record"] is not None:
            group = by_record.pop(letter["recordId"], [])
            if not group:  # replayed with an earlier letter of its record
                continue
            mapped = mapping.apply(json.loads(letter["record"]), letter["recordId"], collected)
        else:
            try:
                event: Any = json.loads(letter["payload"])
            except ValueError:
                out.kept.append((letter["seq"], "not JSON: cannot be sent"))
                continue
            mapped = Mapped([], [])
            as_is.check(event, "", collected, mapped)  # no id of its own: invalid, not invented
        buffer.replay([g["seq"] for g in group], letter["at"], mapped.events, mapped.rejected)
        out.letters += len(group)
        out.events += len(mapped.events)
        out.still_dead += [(letter["seq"], r.reason) for r in mapped.rejected]
    return out
