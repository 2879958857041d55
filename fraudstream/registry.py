"""Schema Registry access through confluent-kafka's SchemaRegistryClient (Confluent REST API).

Errors are split the way the detector needs them: a registry that answers "no such schema"
is a fact about the data (UnknownSchema); a registry that does not answer is infrastructure
(RegistryError), to be retried, never dead-lettered.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from fraudstream.client_config import redact
from fraudstream.errors import RegistryError, RegistryUnavailable, SchemaError
from fraudstream.schemas import SchemaSet, load_schemas, topic_schemas
from fraudstream.settings import Settings

# Registry error codes for "no such subject / version / schema". A bare HTTP 404 without one of
# them comes from something else (a proxy, a wrong URL path) and means the registry was not reached.
NOT_FOUND_CODES = frozenset({40401, 40402, 40403})


def _not_found(exc: SchemaRegistryError) -> bool:
    return exc.http_status_code == 404 and exc.error_code in NOT_FOUND_CODES


class UnknownSchema(Exception):
    """The registry answered, and has no schema with this id."""


class UnusableSchema(Exception):
    """The registry answered with a schema this project cannot read records with: another type (PROTOBUF,
    JSON), or a text that is not Avro's JSON. A fact about the data, like UnknownSchema."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# A schema id as a record names it: the classic integer id (Confluent framing, magic byte 0), or the GUID that
# newer Confluent serializers write in a header or a magic-byte-1 prefix.
SchemaRef = int | uuid.UUID
# A schema as Avro's JSON: a record or other complex type (object), a type's name (string), or a union (array).
AvroJson = dict[str, Any] | str | list[Any]


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    subject: str
    schema_id: int
    version: int
    schema: dict[str, Any]


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.url = settings.registry_url_display  # for messages: never a password
        self._secrets = settings.registry_extra
        user_info = str(settings.registry_extra.get("basic.auth.user.info") or "")
        self._user = f"user {user_info.split(':', 1)[0]}" if ":" in user_info else "this identity"
        # Our timeouts unless the user's client properties say otherwise.
        conf = {"timeout": 10, "max.retries": 2, **settings.registry_client_conf()}
        self.client = SchemaRegistryClient(conf)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnusableSchema:
            raise
        except SchemaRegistryError as exc:
            if exc.http_status_code == 401:
                raise RegistryError(
                    f"schema registry at {self.url} refused the credentials while {what} "
                    f"(HTTP 401): check basic.auth.user.info or bearer.auth.*"
                ) from exc
            if exc.http_status_code == 403:  # authenticated, but its role does not allow this
                raise RegistryError(
                    f"schema registry at {self.url} denied {self._user} the permission for {what} "
                    f"(HTTP 403): this identity may read schemas only; registering and changing "
                    f"settings take a registry admin's credentials"
                ) from exc
            raise
        except Exception as exc:  # httpx transport errors, timeouts: the registry did not answer
            text = redact(str(exc), self._secrets)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                raise RegistryError(
                    f"schema registry at {self.url} refused the TLS handshake while {what}: {text}; "
                    "its certificate is not signed by a CA this client trusts: set ssl.ca.location "
                    "to that CA"
                ) from exc
            raise RegistryUnavailable(f"schema registry at {self.url} unreachable while {what}: {text}") from exc

    def schema_by_id(self, schema_id: SchemaRef) -> AvroJson:
        """The writer schema for a record's id or GUID (the client caches it), as Avro's JSON.

        What the registry answers is data: an id it does not know raises UnknownSchema, and a schema that
        is not Avro (the Confluent API serves PROTOBUF and JSON schemas under the same ids) or whose text
        cannot be read raises UnusableSchema, so that the record is dead-lettered. Only an answer that never
        came (RegistryError) is infrastructure."""
        guid = isinstance(schema_id, uuid.UUID)
        what = f"schema guid {schema_id}" if guid else f"schema id {schema_id}"

        def lookup():
            try:
                return self.client.get_schema_by_guid(str(schema_id)) if guid else self.client.get_schema(schema_id)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:  # an answer the client could not read
                raise UnusableSchema(
                    "unreadable_writer_schema",
                    f"the registry's answer for {what} cannot be read: {type(exc).__name__}: {exc}",
                ) from exc

        try:
            schema = self._call(f"fetching {what}", lookup)
        except SchemaRegistryError as exc:
            # A registry without the GUID endpoint (Apicurio 3.3) answers a bare 404: for a GUID, that is an
            # id nobody can resolve, not an unreachable registry (plain ids are looked up at start-up).
            if _not_found(exc) or (guid and exc.http_status_code == 404):
                raise UnknownSchema(f"{what} is not in the registry") from exc
            raise RegistryError(f"registry refused {what}: {exc}") from exc
        schema_type = getattr(schema, "schema_type", None) or "AVRO"
        if schema_type != "AVRO":
            raise UnusableSchema("not_avro_schema", f"{what} is a {str(schema_type)[:20]!r} schema, not Avro")
        try:
            parsed = json.loads(schema.schema_str)
        except (TypeError, ValueError) as exc:
            raise UnusableSchema("unreadable_writer_schema", f"{what} is not Avro JSON: {exc}") from exc
        if not isinstance(parsed, dict | str | list):
            raise UnusableSchema(
                "unreadable_writer_schema", f"{what} is JSON but not an Avro schema ({type(parsed).__name__})"
            )
        return parsed

    def latest(self, subject: str) -> RegisteredSchema:
        try:
            found = self._call(f"looking up {subject}", self.client.get_latest_version, subject)
        except SchemaRegistryError as exc:
            if _not_found(exc):
                raise SchemaError(
                    f"subject {subject} is not registered; run `fraudstream schemas register` first"
                ) from exc
            raise RegistryError(f"registry refused {subject}: {exc}") from exc
        return RegisteredSchema(subject, found.schema_id, found.version, json.loads(found.schema.schema_str))

    def versions(self, subject: str) -> list[int]:
        try:
            return self._call(f"listing {subject}", self.client.get_versions, subject)
        except SchemaRegistryError as exc:
            if _not_found(exc):
                return []
            raise RegistryError(f"registry refused {subject}: {exc}") from exc

    def version(self, subject: str, version: int) -> dict[str, Any]:
        found = self._call(f"reading {subject} v{version}", self.client.get_version, subject, version)
        return json.loads(found.schema.schema_str)

    def register(self, subject: str, schema_text: str) -> int:
        try:
            return self._call(
                f"registering {subject}", self.client.register_schema, subject, Schema(schema_text, "AVRO")
            )
        except SchemaRegistryError as exc:
            if exc.http_status_code == 409:
                raise SchemaError(
                    f"{subject}: the registry rejected the schema as incompatible: {exc.error_message}"
                ) from exc
            raise RegistryError(f"registry refused {subject}: {exc}") from exc

    def is_compatible(self, subject: str, schema_text: str) -> bool:
        try:
            return self._call(
                f"checking {subject}", self.client.test_compatibility, subject, Schema(schema_text, "AVRO")
            )
        except SchemaRegistryError as exc:
            if _not_found(exc):
                return True  # nothing registered yet: anything is compatible
            raise RegistryError(f"registry refused the compatibility check for {subject}: {exc}") from exc

    def set_compatibility(self, subject: str | None, level: str) -> None:
        what = f"setting compatibility of {subject or 'the registry'}"
        try:
            self._call(what, self.client.set_compatibility, subject, level)
        except SchemaRegistryError as exc:
            # Apicurio answers 409 "rule already exists" when a retried request's first attempt, timed out on our
            # side, had created the rule: the level asked for is then in place, or one more request updates it.
            if exc.http_status_code == 409 and subject is not None:
                if self.compatibility(subject) == level:
                    return
                try:
                    self._call(what, self.client.set_compatibility, subject, level)
                    return
                except SchemaRegistryError as again:
                    exc = again
            raise RegistryError(f"registry refused {what}: {exc}") from exc

    def compatibility(self, subject: str) -> str | None:
        try:
            return self._call(f"reading compatibility of {subject}", self.client.get_compatibility, subject)
        except SchemaRegistryError:
            return None


def register_all(settings: Settings, registry: Registry | None = None) -> dict[str, int]:
    """The deliberate registration step: every topic's schema under <topic>-value, with its compatibility level."""
    registry = registry or Registry(settings)
    schemas = load_schemas(settings.schemas_dir)
    ids = {}
    for topic, name in topic_schemas(settings).items():
        subject = settings.subject(topic)
        registry.set_compatibility(subject, settings.compatibility)
        ids[subject] = registry.register(subject, schemas.text(name))
    return ids


def current_ids(settings: Settings, registry: Registry, schemas: SchemaSet | None = None) -> dict[str, int]:
    """Ids of our current schemas as registered, per topic; a clear error when registration is missing."""
    schemas = schemas or load_schemas(settings.schemas_dir)
    ids = {}
    for topic, name in topic_schemas(settings).items():
        subject = settings.subject(topic)
        try:
            found = registry._call(
                f"looking up {subject}", registry.client.lookup_schema, subject, Schema(schemas.text(name), "AVRO")
            )
        except SchemaRegistryError as exc:
            if _not_found(exc):
                raise SchemaError(
                    f"the current {name} schema is not registered under {subject}; "
                    "run `fraudstream schemas register` first"
                ) from exc
            raise RegistryError(f"registry refused the lookup of {subject}: {exc}") from exc
        ids[topic] = found.schema_id
    return ids
