"""The mapping table of vendor webhooks (connectors/default.toml, or LEADFLOW_CONNECTORS):
which vendor event becomes which Leadflow event, which vendor field which profile fact.

Pure: no I/O beyond reading the file, no clock. The vendor modules (mautic.py, hubspot.py)
know where a payload keeps its ids and times; this table decides what the data means, so
a marketing-ops team changes the meaning without changing code.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from funnel.models import NAME_PATTERN

DEFAULT_CONNECTORS = Path(__file__).resolve().parent / "default.toml"
VENDORS = ("mautic", "hubspot")


class MappingError(ValueError):
    """The mapping file cannot be used (said with the file and the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventRule(_Strict):
    vendor: str = Field(min_length=1)
    when: dict[str, str] = Field(default_factory=dict)
    type: str | None = Field(default=None, pattern=NAME_PATTERN)
    ignore: bool = False
    channel: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    campaign_from: str | None = None

    @field_validator("ignore")
    @classmethod
    def _one_outcome(cls, ignore: bool, info) -> bool:
        if ignore == (info.data.get("type") is not None):
            raise ValueError("a rule has either `type` (the Leadflow event type) or `ignore = true`")
        return ignore

    def matches(self, vendor_type: str, item: dict) -> bool:
        return vendor_type == self.vendor and all(
            fnmatch.fnmatchcase(_text(pluck(item, path)).lower(), pattern.lower())
            for path, pattern in self.when.items()
        )


class FactRule(_Strict):
    fact: str = Field(pattern=NAME_PATTERN)
    as_: Literal["str", "int", "float", "bool"] = Field(default="str", alias="as")
    map: dict[str, str | int | float | bool] = Field(default_factory=dict)

    def convert(self, value: Any) -> str | int | float | bool | None:
        """The fact's value from the vendor's, or None when there is nothing usable (empty,
        or not a number where one is expected): such a field is left out, not guessed."""
        if value is None or value == "":
            return None
        text = _text(value)
        if text in self.map:
            return self.map[text]
        try:
            if self.as_ == "int":
                return int(float(text))
            if self.as_ == "float":
                return float(text)
            if self.as_ == "bool":
                return text.strip().lower() in ("true", "1", "yes")
        except ValueError:
            return None
        return text[:500]


class VendorMapping(_Strict):
    max_age_hours: float = Field(gt=0, le=24 * 30)
    events: list[EventRule] = Field(default_factory=list)
    facts: dict[str, FactRule] = Field(default_factory=dict)

    @field_validator("facts", mode="before")
    @classmethod
    def _short_form(cls, facts: dict) -> dict:
        return {field: {"fact": rule} if isinstance(rule, str) else rule for field, rule in (facts or {}).items()}

    def rule_for(self, vendor_type: str, item: dict) -> EventRule | None:
        return next((rule for rule in self.events if rule.matches(vendor_type, item)), None)

    def facts_of(self, item: dict, only: set[str] | None = None) -> dict[str, str | int | float | bool]:
        """The profile facts the mapped fields of `item` give (fields absent or empty left out)."""
        facts = {}
        for path, rule in self.facts.items():
            if only is not None and path not in only:
                continue
            value = rule.convert(pluck(item, path))
            if value is not None:
                facts[rule.fact] = value
        return facts


class Connectors(_Strict):
    mautic: VendorMapping
    hubspot: VendorMapping

    def of(self, vendor: str) -> VendorMapping:
        return getattr(self, vendor)


def load_connectors(path: Path = DEFAULT_CONNECTORS) -> Connectors:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise MappingError(f"{path}: {err}") from None
    try:
        return Connectors.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MappingError(f"{path}: {where}: {first['msg']}") from None


def pluck(item: Any, path: str) -> Any:
    """The value at a dotted path ("hit.lead.id"), or None where the path ends early."""
    for part in path.split("."):
        if isinstance(item, dict):
            item = item.get(part)
        elif isinstance(item, list) and part.isdigit() and int(part) < len(item):
            item = item[int(part)]
        else:
            return None
    return item


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
