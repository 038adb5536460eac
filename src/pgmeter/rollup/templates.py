"""Per-meter SQL from the templates in ``sql/templates/``.

Templates are plain SQL with ``{name}`` placeholders, filled with psycopg.sql so
that identifiers are quoted (``sql.Identifier``) and DDL literals escaped
(``sql.Literal``); statements that run often (the merge) take their values as
bind parameters instead. Only fixed SQL fragments from this package and quoted
names or literals are ever substituted, never raw user input.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from psycopg import sql


@cache
def load(name: str) -> str:
    """The template ``sql/templates/<name>.sql`` without its full-line comments.

    Comments are dropped before formatting: they mention the placeholders, and a
    multi-line fragment substituted into a ``--`` line would escape the comment.
    """
    text = resources.files("pgmeter.sql").joinpath("templates", f"{name}.sql").read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))


def render(name: str, **parts: sql.Composable | str) -> str:
    """Fill template ``name``; plain strings are trusted fixed SQL fragments."""
    values = {key: sql.SQL(value) if isinstance(value, str) else value for key, value in parts.items()}
    return sql.SQL(load(name)).format(**values).as_string()


def join(parts: list[sql.Composable]) -> sql.Composable:
    """``, a, b`` (each part preceded by a comma), or nothing."""
    return sql.Composed([sql.SQL(", ") + part for part in parts]) if parts else sql.SQL("")
