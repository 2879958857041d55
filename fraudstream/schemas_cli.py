"""`fraudstream schemas register | check | check-offline`.

register       the deliberate step: each topic's schema under <topic>-value, compatibility level set per subject
check          asks the registry (its compatibility endpoint) whether the local schemas may be registered
check-offline  no registry: the current schemas against every version kept in schemas/history
"""

from __future__ import annotations

import argparse

from fraudstream.errors import SchemaError
from fraudstream.registry import Registry, register_all
from fraudstream.schemas import compatibility_problems, history, load_schemas, topic_schemas
from fraudstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    parser.add_argument("action", choices=("register", "check", "check-offline"))
    parser.add_argument(
        "--compatibility",
        help="level set on each subject by register and assumed by check-offline "
        "[FRAUDSTREAM_COMPATIBILITY, default FULL_TRANSITIVE]",
    )
    add_connection_arguments(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "register":
        for subject, schema_id in register_all(settings).items():
            print(f"registered {subject:32} id {schema_id:<6} compatibility {settings.compatibility}")
        return 0
    if args.action == "check":
        return _report(check_against_registry(settings))
    return _report(check_offline(settings))


def check_offline(settings: Settings) -> list[tuple[str, list[str]]]:
    """(schema name, problems) for each schema against its kept history, under the configured level."""
    schemas = load_schemas(settings.schemas_dir)
    return [
        (
            f"{name} (vs {len(old)} earlier version{'s' if len(old) != 1 else ''})",
            compatibility_problems(schemas.expanded[name], [schema for _, schema in old], settings.compatibility),
        )
        for name in schemas.expanded
        for old in [history(settings.schemas_dir, name)]
    ]


def check_against_registry(settings: Settings) -> list[tuple[str, list[str]]]:
    """(subject, problems) per subject. The registry gives the verdict; the reason comes from
    re-running the same rules locally against the registered versions (registries answer yes/no)."""
    registry = Registry(settings)
    schemas = load_schemas(settings.schemas_dir)
    results: list[tuple[str, list[str]]] = []
    for topic, name in topic_schemas(settings).items():
        subject = settings.subject(topic)
        if registry.is_compatible(subject, schemas.text(name)):
            results.append((subject, []))
            continue
        level = registry.compatibility(subject) or settings.compatibility
        registered = [registry.version(subject, v) for v in registry.versions(subject)]
        reasons = compatibility_problems(schemas.expanded[name], registered, level) or [
            "the registry says incompatible"
        ]
        results.append((f"{subject} [{level}]", reasons))
    return results


def _report(results: list[tuple[str, list[str]]]) -> int:
    failed = 0
    for what, problems in results:
        if problems:
            failed += 1
            print(f"INCOMPATIBLE  {what}")
            for problem in problems:
                print(f"    - {problem}")
        else:
            print(f"ok            {what}")
    if failed:
        raise SchemaError(f"{failed} schema{'s are' if failed > 1 else ' is'} incompatible (see above)")
    return 0
