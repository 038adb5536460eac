"""Meter definitions and OpenMeter's rules for them.

The model is shared by the config file and the API, so a meter declared in
``pgmeter.yaml`` is checked exactly like one sent to ``POST /api/v1/meters``.

Two layers of rules. The model itself enforces what never changes: anchored slug
and key patterns, no control characters or unpaired surrogates in any field,
view-column names that cannot collide, and hard caps (see ``jsonpath``) that keep
parsing cheap. :func:`check_limits` enforces the configurable ``limits`` section
at the door (API and config file); a stored meter is never re-judged by it, so
tightening a limit cannot break reading meters made under the old one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgmeter.meters.jsonpath import MAX_PATH_DEPTH, InvalidJSONPath, check_size, compile_path

# \A...\Z, not ^...$: "$" also matches before a trailing newline, which made
# look-alike meters ("calls\n") whose CSV header then broke the connection.
SLUG_PATTERN = re.compile(r"\A[a-z0-9]+(?:_[a-z0-9]+)*\Z")
GROUP_BY_KEY_PATTERN = re.compile(r"\A[a-zA-Z_][0-9a-zA-Z_]*\Z")
# A key names a view column: Postgres truncates identifiers past 63 bytes.
MAX_GROUP_BY_KEY = 63
# The rollup's primary key is (subject, bucket, g1..gN) and an index holds at most
# 32 columns; limits.meterGroupByKeys may not exceed this.
MAX_GROUP_BY_KEYS = 30
# Names the query API reserves for its own group-by dimensions.
RESERVED_GROUP_BY_KEYS = frozenset({"subject", "customer_id"})
# The fixed columns of a meter's view (rollup/objects.py, _view_columns): a key with
# one of these names is presented as group_<key>.
VIEW_FIXED_COLUMNS = frozenset({"window_start", "window_end", "subject", "value"})
# eventFrom must be an instant every reader can do arithmetic around (a year-1 value
# was stored as -infinity and broke every query of the meter).
EVENT_FROM_MIN = datetime(1970, 1, 1, tzinfo=UTC)
EVENT_FROM_MAX = datetime(9999, 1, 1, tzinfo=UTC)
# metadata: a label map, not a document store.
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 256
MAX_METADATA_VALUE = 1024

# Control characters (C0 and DEL) and unpaired UTF-16 surrogates (from \udXXX
# escapes in JSON): Postgres cannot store NUL or surrogates, and the others break
# headers, CSV and logs. A description may keep tabs and line breaks.
_BAD_CHARS = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_BAD_CHARS_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def check_chars(value: str, *, text: bool = False) -> None:
    """Raise ``ValueError`` naming the first character a meter field may not hold."""
    found = (_BAD_CHARS_TEXT if text else _BAD_CHARS).search(value)
    if found is None:
        return
    char = found.group()
    if char == "\x00":
        raise ValueError("must not contain NUL characters")
    if "\ud800" <= char <= "\udfff":
        raise ValueError("must not contain unpaired UTF-16 surrogates")
    raise ValueError(f"must not contain control characters (found U+{ord(char):04X})")


def view_column(key: str) -> str:
    """The name group-by key ``key`` has as a column of the meter's view."""
    return f"group_{key}" if key in VIEW_FIXED_COLUMNS else key


class Aggregation(StrEnum):
    SUM = "SUM"
    COUNT = "COUNT"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    AVG = "AVG"
    MIN = "MIN"
    MAX = "MAX"
    LATEST = "LATEST"


class MeterSpec(BaseModel):
    """What a user declares: OpenMeter's ``MeterCreate`` shape.

    Unknown keys (such as the retired ``windowSize``) are ignored, as OpenMeter does.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    slug: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=1024)
    aggregation: Aggregation
    event_type: str = Field(alias="eventType", min_length=1, max_length=256)
    event_from: datetime | None = Field(default=None, alias="eventFrom")
    value_property: str | None = Field(default=None, alias="valueProperty")
    group_by: dict[str, str] = Field(default_factory=dict, alias="groupBy")
    metadata: dict[str, str] | None = None

    @field_validator("slug")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not SLUG_PATTERN.match(value):
            raise ValueError("must match ^[a-z0-9]+(?:_[a-z0-9]+)*$")
        return value

    @field_validator("name", "event_type", "value_property")
    @classmethod
    def _plain_text(cls, value: str | None) -> str | None:
        if value is not None:
            check_chars(value)
        return value

    @field_validator("description")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None:
            check_chars(value, text=True)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_ENTRIES:
            raise ValueError(f"must have at most {MAX_METADATA_ENTRIES} entries")
        for key, item in value.items():
            if not key or len(key) > MAX_METADATA_KEY:
                raise ValueError(f"keys must be 1 to {MAX_METADATA_KEY} characters")
            if len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"value of {key[:64]!r} must be at most {MAX_METADATA_VALUE} characters")
            try:
                check_chars(key)
                check_chars(item)
            except ValueError as exc:
                raise ValueError(f"entry {key[:64]!r}: {exc}") from None
        return value

    @field_validator("group_by", mode="after")
    @classmethod
    def _group_by_size(cls, value: dict[str, str]) -> dict[str, str]:
        # Before any path is parsed: a thousand keys or a megabyte path cost nothing here.
        if len(value) > MAX_GROUP_BY_KEYS:
            raise ValueError(f"must have at most {MAX_GROUP_BY_KEYS} keys")
        for key, path in value.items():
            if len(key) > MAX_GROUP_BY_KEY or not GROUP_BY_KEY_PATTERN.match(key):
                raise ValueError(f"key {key[:80]!r} must match ^[a-zA-Z_][0-9a-zA-Z_]*$ "
                                 f"and be at most {MAX_GROUP_BY_KEY} characters")
            try:
                check_chars(path)
                check_size(path)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return value

    @field_validator("event_from")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone offset")
        if value is not None and not EVENT_FROM_MIN <= value < EVENT_FROM_MAX:
            raise ValueError("must be from 1970-01-01T00:00:00Z up to (not including) 9999-01-01T00:00:00Z")
        # Event times compare at whole seconds (OpenMeter stores seconds); a fraction
        # here would count events in the tail that the merge then leaves out.
        return value.replace(microsecond=0) if value is not None else None

    @field_validator("group_by", mode="before")
    @classmethod
    def _null_group_by(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _openmeter_rules(self) -> MeterSpec:
        if self.aggregation is Aggregation.COUNT:
            if self.value_property:
                raise ValueError("meter value property is not allowed when the aggregation is count")
        else:
            if not self.value_property:
                raise ValueError(f"valueProperty is required for {self.aggregation} meters")
            _check_path("valueProperty", self.value_property)
        columns: dict[str, str] = {}
        for key, path in self.group_by.items():
            if key in RESERVED_GROUP_BY_KEYS:
                raise ValueError(f"groupBy key {key!r} is reserved by the query API")
            column = view_column(key)
            if column in columns:
                raise ValueError(f"groupBy keys {columns[column]!r} and {key!r} would both be the view "
                                 f"column {column!r}; rename one")
            columns[column] = key
            _check_path(f"groupBy.{key}", path)
            if path == self.value_property:
                raise ValueError(f"groupBy.{key} must not be the valueProperty")
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.slug

    def value_path(self) -> list[str] | None:
        return compile_path(self.value_property) if self.value_property else None

    def group_paths(self) -> dict[str, list[str]]:
        return {key: compile_path(path) for key, path in self.group_by.items()}

    def definition(self) -> dict[str, Any]:
        """The fields that decide a meter's numbers (and so its rollup)."""
        return {
            "aggregation": str(self.aggregation),
            "eventType": self.event_type,
            "valueProperty": self.value_property,
            "groupBy": dict(sorted(self.group_by.items())),
            "eventFrom": self.event_from.isoformat() if self.event_from else None,
        }


def _check_path(field: str, path: str) -> None:
    if not path.startswith("$"):
        raise ValueError(f"{field} must be a JSONPath starting with $")
    try:
        compile_path(path)
    except InvalidJSONPath as exc:
        raise ValueError(f"{field}: invalid JSONPath: {exc}") from None


def check_limits(spec: MeterSpec, *, group_by_keys: int, json_path_bytes: int,
                 json_path_depth: int = MAX_PATH_DEPTH) -> list[tuple[str, str]]:
    """The configurable limits (the ``limits`` settings) a definition breaks, as (field, message).

    Takes numbers rather than the settings, so callers with other limits (a test, a
    tool) need no Settings.
    """
    problems: list[tuple[str, str]] = []
    if len(spec.group_by) > group_by_keys:
        problems.append(("groupBy", f"must have at most {group_by_keys} keys (limits.meterGroupByKeys)"))
    paths = [("valueProperty", spec.value_property)] if spec.value_property else []
    paths += [(f"groupBy.{key}", path) for key, path in spec.group_by.items()]
    for field, path in paths:
        try:
            check_size(path, json_path_bytes, json_path_depth)
        except InvalidJSONPath as exc:
            problems.append((field, f"{exc} (limits.jsonPathBytes, limits.jsonPathDepth)"))
    return problems
