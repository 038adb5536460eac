"""The JSONPath subset meters may use, and its translation to a jsonb path.

OpenMeter test-compiles meter paths with ClickHouse ``JSON_VALUE``, which reads only
plain member and index steps (``$.a.b``, ``$.a[0]``, ``$['a']``). We accept exactly
that subset: the path is parsed with jsonpath-ng, every step is checked, and the
result becomes a ``text[]`` for Postgres' ``#>`` / ``#>>`` operators, passed as a
bind parameter. Values are therefore extracted inside Postgres, never in Python.
"""

from __future__ import annotations

from jsonpath_ng import parse
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.jsonpath import Child, Fields, Index, JSONPath, Root

# The most any configuration may allow (limits.jsonPathBytes and limits.jsonPathDepth
# are capped at these). jsonpath-ng's parser recurses once per step and takes time
# quadratic in the length, so both are checked on the raw text before it is parsed:
# a megabyte path is refused in microseconds instead of blocking the event loop.
MAX_PATH_BYTES = 4096
MAX_PATH_DEPTH = 64


class InvalidJSONPath(ValueError):
    """A path outside the supported subset."""


def _steps(node: JSONPath) -> list[str]:
    if isinstance(node, Root):
        return []
    if isinstance(node, Child):
        return _steps(node.left) + _steps(node.right)
    if isinstance(node, Fields) and len(node.fields) == 1 and node.fields[0] != "*":
        return [node.fields[0]]
    if isinstance(node, Index) and len(node.indices) == 1 and node.indices[0] >= 0:
        return [str(node.indices[0])]
    raise InvalidJSONPath(f"unsupported JSONPath step {node}")


def check_size(path: str, max_bytes: int = MAX_PATH_BYTES, max_depth: int = MAX_PATH_DEPTH) -> None:
    """Refuse a path too long or too deep to parse, without parsing it.

    Every step starts with ``.`` or ``[``, so their count bounds the depth from above
    (a quoted name containing them counts more, never less).
    """
    if len(path) > max_bytes or len(path.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidJSONPath(f"must be at most {max_bytes} bytes")
    if path.count(".") + path.count("[") > max_depth:
        raise InvalidJSONPath(f"must have at most {max_depth} steps")


def compile_path(path: str) -> list[str]:
    """Return the jsonb path (``text[]`` elements) for a supported JSONPath.

    >>> compile_path("$.a.b[0]")
    ['a', 'b', '0']
    """
    if not path.startswith("$"):
        raise InvalidJSONPath("a JSONPath must start with $")
    check_size(path)
    try:
        parsed = parse(path)
    except (JsonPathLexerError, JsonPathParserError, Exception) as exc:  # the lexer raises bare Exceptions too
        raise InvalidJSONPath(f"invalid JSONPath {path!r}: {exc}") from None
    steps = _steps(parsed)
    if not steps:
        raise InvalidJSONPath("a JSONPath must select a property, not the whole event data")
    return steps
