"""The Avro contract: load schemas/*.avsc, map topics to subjects, check evolution offline.

schemas/<name>.avsc is the current version of each schema; schemas/history/<name>/v<N>.avsc
keeps every earlier released version (fully expanded), for the evolution checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityType,
    lookup_writer_field,
    schema_name_equals,
)
from fastavro.schema import expand_schema, parse_schema

from fraudstream.errors import SchemaError
from fraudstream.settings import Settings

# Record name -> file stem, in dependency order (a schema may name the ones before it).
SCHEMA_FILES: dict[str, str] = {
    "Transaction": "transaction",
    "FraudAlert": "fraud_alert",
    "Label": "label",
    "Rule": "rule",
    "ShadowDifference": "shadow_difference",
}


@dataclass(frozen=True, slots=True)
class SchemaSet:
    """Every current schema, expanded (self-contained JSON, as registered) and parsed for fastavro."""

    expanded: dict[str, dict[str, Any]]
    parsed: dict[str, Any]

    def text(self, name: str) -> str:
        """The schema string sent to the registry."""
        return json.dumps(self.expanded[name], separators=(",", ":"))


def load_schemas(schemas_dir: Path) -> SchemaSet:
    return _load_schemas(Path(schemas_dir).resolve())


@cache
def _load_schemas(schemas_dir: Path) -> SchemaSet:
    sources = []
    for stem in SCHEMA_FILES.values():
        path = schemas_dir / f"{stem}.avsc"
        try:
            sources.append(json.loads(path.read_text()))
        except OSError as exc:
            raise SchemaError(f"cannot read {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise SchemaError(f"{path} is not valid JSON: {exc}") from exc
    try:
        expanded_list = expand_schema(sources)
    except Exception as exc:  # fastavro raises several types for a bad schema
        raise SchemaError(f"invalid schema in {schemas_dir}: {exc}") from exc
    expanded = dict(zip(SCHEMA_FILES, expanded_list, strict=True))
    # A record schema parses to a dict.
    parsed = {name: cast(dict[str, Any], parse_schema(schema)) for name, schema in expanded.items()}
    for name, schema in parsed.items():
        if schema["name"].rsplit(".", 1)[-1] != name:
            raise SchemaError(f"{SCHEMA_FILES[name]}.avsc defines {schema['name']}, expected a record named {name}")
    return SchemaSet(expanded=expanded, parsed=parsed)


def topic_schemas(settings: Settings) -> dict[str, str]:
    """Which record each Avro topic carries. The dead-letter topic carries raw bytes and has none."""
    return {
        settings.transactions_topic: "Transaction",
        settings.legit_topic: "Transaction",
        settings.fraud_topic: "FraudAlert",
        settings.labels_topic: "Label",
        settings.rules_topic: "Rule",
        settings.shadow_topic: "ShadowDifference",
    }


def history(schemas_dir: Path, name: str) -> list[tuple[int, dict[str, Any]]]:
    """Earlier released versions of a schema, oldest first."""
    folder = Path(schemas_dir) / "history" / SCHEMA_FILES[name]
    versions = []
    for path in folder.glob("v*.avsc"):
        try:
            versions.append((int(path.stem[1:]), json.loads(path.read_text())))
        except (ValueError, json.JSONDecodeError) as exc:
            raise SchemaError(f"bad history file {path}: {exc}") from exc
    return sorted(versions, key=lambda item: item[0])


def compatibility_problems(new: dict[str, Any], previous: list[dict[str, Any]], level: str) -> list[str]:
    """Why `new` breaks `level` against earlier versions (oldest first); empty when it is compatible.

    Uses the avro package's reader/writer checker, the same rules the registries apply.
    """
    if level == "NONE" or not previous:
        return []
    against = previous if level.endswith("_TRANSITIVE") else previous[-1:]
    base = level.removesuffix("_TRANSITIVE")
    new_schema = _avro(new)
    problems = []
    for index, old in enumerate(against, start=len(previous) - len(against) + 1):
        old_schema = _avro(old)
        if base in ("BACKWARD", "FULL"):
            problems += [
                f"new schema cannot read version {index} data: {msg}"
                for msg in _incompatibilities(new_schema, old_schema)
            ]
        if base in ("FORWARD", "FULL"):
            problems += [
                f"version {index} readers cannot read new data: {msg}"
                for msg in _incompatibilities(old_schema, new_schema)
            ]
    return problems


def _avro(schema: dict[str, Any]) -> avro.schema.Schema:
    try:
        return avro.schema.parse(json.dumps(schema))
    except avro.errors.SchemaParseException as exc:
        raise SchemaError(f"invalid schema: {exc}") from exc


def _incompatibilities(reader: avro.schema.Schema, writer: avro.schema.Schema) -> list[str]:
    checker = ReaderWriterCompatibilityChecker()
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    reasons, explained = _field_reasons(checker, reader, writer, "")
    # Whatever no field accounts for, e.g. a renamed record.
    reasons += sorted(message for message in result.messages if message not in explained)
    return reasons or ["incompatible"]


def _field_reasons(
    checker: ReaderWriterCompatibilityChecker, reader: avro.schema.Schema, writer: avro.schema.Schema, prefix: str
) -> tuple[list[str], set[str]]:
    """One reason per incompatible field, named by its path, and the checker messages they explain.

    The checker keeps a result's messages and locations in unordered sets, so several problems cannot
    be paired with their fields afterwards; asking field by field (answers are memoized) can.
    """
    reasons: list[str] = []
    explained: set[str] = set()
    if not (reader.type == writer.type == "record"):
        return reasons, explained
    # Records, as their type says.
    assert isinstance(reader, avro.schema.RecordSchema) and isinstance(writer, avro.schema.RecordSchema)
    if not schema_name_equals(reader, writer):
        where = f"field {prefix.removesuffix('.')}: " if prefix else ""
        reasons.append(f"{where}record {reader.fullname} cannot read {writer.fullname}: different name, no alias")
        explained.add(f"expected: {writer.fullname}")
    for field in reader.fields:
        path = f"{prefix}{field.name}"
        writer_field = lookup_writer_field(writer_schema=writer, reader_field=field)
        if writer_field is None:
            if not field.has_default:
                reasons.append(f"field {path}: reader field missing default value (the writer has no such field)")
                explained.add(field.name)
            continue
        found = checker.get_compatibility(field.type, writer_field.type, "type", [])
        if found.compatibility is not SchemaCompatibilityType.incompatible:
            continue
        messages = found.messages
        if field.type.type == writer_field.type.type == "record":
            nested, nested_explained = _field_reasons(checker, field.type, writer_field.type, f"{path}.")
            reasons += nested
            explained |= nested_explained
            messages = messages - nested_explained
            if not messages:
                continue
        kinds = ", ".join(sorted({kind.value.replace("_", " ") for kind in found.incompatibilities}))
        reasons.append(f"field {path}: {kinds}: {'; '.join(sorted(messages))}")
        explained |= messages
    return reasons, explained
