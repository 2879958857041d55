"""Typed records: one frozen dataclass per Avro record in schemas/.

Field names, order and types mirror the .avsc files; tests/unit/test_records.py fails when
they drift. Avro timestamp-millis values are timezone-aware UTC datetimes here (as fastavro
decodes them); money is integer cents.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    avro_name: ClassVar[str] = "Transaction"

    transaction_id: str
    account_id: str
    card_id: str
    merchant_id: str
    merchant_category: str
    terminal_id: str
    amount_cents: int
    currency: str = "USD"
    event_time: datetime
    channel: str  # a symbol of the Channel enum in transaction.avsc
    country: str
    city: str
    latitude: float
    longitude: float
    device_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS[Transaction]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transaction:
        if len(data) == len(_FIELDS[cls]):  # decoded with the current schema: the hot path
            return cls(**data)
        # Readers on an older schema hand us fewer fields; defaults fill them like Avro would.
        return cls(**{name: data[name] for name in _FIELDS[cls] if name in data})


@dataclass(frozen=True, slots=True, kw_only=True)
class FiredRule:
    avro_name: ClassVar[str] = "FiredRule"

    id: str
    version: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FiredRule:
        return cls(id=data["id"], version=data["version"])


@dataclass(frozen=True, slots=True, kw_only=True)
class FraudAlert:
    avro_name: ClassVar[str] = "FraudAlert"

    transaction: Transaction
    rules: tuple[str, ...]
    detected_at: datetime
    fired: tuple[FiredRule, ...] = ()
    rule_set_version: str = ""
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "transaction": self.transaction.to_dict(),
            "rules": list(self.rules),
            "detected_at": self.detected_at,
            "fired": [f.to_dict() for f in self.fired],
            "rule_set_version": self.rule_set_version,
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FraudAlert:
        # Alerts written before rules had versions lack fired and rule_set_version, before scores the score;
        # Avro readers fill the defaults.
        return cls(
            transaction=Transaction.from_dict(data["transaction"]),
            rules=tuple(data["rules"]),
            detected_at=data["detected_at"],
            fired=tuple(FiredRule.from_dict(f) for f in data.get("fired", ())),
            rule_set_version=data.get("rule_set_version", ""),
            score=data.get("score"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Label:
    avro_name: ClassVar[str] = "Label"

    transaction_id: str
    is_fraud: bool
    scenario: str
    terminal_id: str | None = None
    event_time: datetime | None = None
    source: str = "generator"  # "analyst" for a verdict given in the console
    labelled_by: str | None = None
    labelled_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "is_fraud": self.is_fraud,
            "scenario": self.scenario,
            "terminal_id": self.terminal_id,
            "event_time": self.event_time,
            "source": self.source,
            "labelled_by": self.labelled_by,
            "labelled_at": self.labelled_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Label:
        # Labels written before terminal_id and event_time, or before source, labelled_by and labelled_at,
        # lack them; Avro readers fill the defaults.
        return cls(
            transaction_id=data["transaction_id"],
            is_fraud=data["is_fraud"],
            scenario=data["scenario"],
            terminal_id=data.get("terminal_id"),
            event_time=data.get("event_time"),
            source=data.get("source", "generator"),
            labelled_by=data.get("labelled_by"),
            labelled_at=data.get("labelled_at"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One version of one detection rule (the rules topic's records). Parameter lists are tuples here."""

    avro_name: ClassVar[str] = "Rule"

    id: str
    version: int
    kind: str
    parameters: dict[str, bool | int | float | str | tuple[str, ...]]
    enabled: bool
    author: str
    comment: str
    written_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "kind": self.kind,
            "enabled": self.enabled,
            "parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in self.parameters.items()},
            "author": self.author,
            "comment": self.comment,
            "written_at": self.written_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        return cls(
            id=data["id"],
            version=data["version"],
            kind=data["kind"],
            enabled=data["enabled"],
            parameters={k: tuple(v) if isinstance(v, list) else v for k, v in data["parameters"].items()},
            author=data["author"],
            comment=data["comment"],
            written_at=data["written_at"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ShadowDifference:
    """A transaction the shadow rule set decided otherwise than the live rules that routed it (the shadow topic)."""

    avro_name: ClassVar[str] = "ShadowDifference"

    transaction_id: str
    source_partition: int
    source_offset: int
    event_time: datetime
    live_fraud: bool
    live_rules: tuple[str, ...]
    live_rule_set_version: str
    shadow_fraud: bool
    shadow_rules: tuple[str, ...]
    shadow_rule_set_version: str
    score: float
    detected_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in _FIELDS[ShadowDifference]},
            "live_rules": list(self.live_rules),
            "shadow_rules": list(self.shadow_rules),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShadowDifference:
        return cls(
            **{name: data[name] for name in _FIELDS[ShadowDifference]}
            | {"live_rules": tuple(data["live_rules"]), "shadow_rules": tuple(data["shadow_rules"])}
        )


RECORD_TYPES: tuple[type, ...] = (Transaction, FiredRule, FraudAlert, Label, Rule, ShadowDifference)
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in RECORD_TYPES}
