"""Meter definitions and OpenMeter's rules for them.

The model is shared by the config file and the API, so a meter declared in
``pgmeter.yaml`` is checked exactly like one sent to ``POST /api/v1/meters``.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgmeter.meters.jsonpath import InvalidJSONPath, compile_path

SLUG_PATTERN = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
GROUP_BY_KEY_PATTERN = re.compile(r"^[a-zA-Z_][0-9a-zA-Z_]*$")
# Names the query API reserves for its own group-by dimensions.
RESERVED_GROUP_BY_KEYS = frozenset({"subject", "customer_id"})


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

    @field_validator("event_from")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone offset")
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
        for key, path in self.group_by.items():
            if not GROUP_BY_KEY_PATTERN.match(key):
                raise ValueError(f"groupBy key {key!r} must match ^[a-zA-Z_][0-9a-zA-Z_]*$")
            if key in RESERVED_GROUP_BY_KEYS:
                raise ValueError(f"groupBy key {key!r} is reserved by the query API")
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
