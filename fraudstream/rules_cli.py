"""`fraudstream rules`: read and change the detection rules on the rules topic, while detectors run.

    fraudstream rules list                 the rules in force (latest valid version of each)
    fraudstream rules show ID              one rule, as JSON
    fraudstream rules set FILE             write the rules of a TOML file (validated first; all or nothing)
    fraudstream rules enable ID | disable ID
    fraudstream rules history ID           every version still on the topic, oldest first

A FILE has one table per rule id, as the rules file does: `[large_amount]` with `threshold_cents = 50000`.
`kind` names the predicate (default: the id, so the rules file's tables work as they are) and `enabled`
defaults to true; the other keys are the kind's parameters, checked as `detect --rules` checks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from fraudstream.consumer.rules_topic import RulesCodec, read_all, rule_thresholds, same_content, write_records
from fraudstream.records import Rule
from fraudstream.errors import ConfigError
from fraudstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the rules in force")
    for name, help_text in (("show", "one rule, as JSON"), ("enable", "enable a rule (a new version)"),
                            ("disable", "disable a rule (a new version)"), ("history", "every version of a rule")):
        sub.add_parser(name, help=help_text).add_argument("rule_id", metavar="ID")
    set_parser = sub.add_parser("set", help="write the rules of a TOML file, validated first")
    set_parser.add_argument("file", type=Path, metavar="FILE")
    for name in ("set", "enable", "disable"):
        action = sub.choices[name]
        action.add_argument("--author", default=getpass.getuser(), help="who writes it (default: the OS user)")
        action.add_argument("--comment", default="", help="why")
    for action in sub.choices.values():
        add_connection_arguments(action)


def run(args: argparse.Namespace, settings: Settings) -> int:
    codec = RulesCodec(settings)
    if args.action == "set":
        records = write_rules_text(settings, _read_rules_file(args.file), f"rules file {args.file}",
                                   author=args.author, comment=args.comment, codec=codec)
        for record in records:
            print(f"{record.id} v{record.version} written")
        return 0
    rules = latest(settings, codec)
    if args.action == "list":
        for record in sorted(rules.values(), key=lambda r: r.id):
            state = "enabled " if record.enabled else "disabled"
            print(f"{record.id:24} v{record.version:<4} {record.kind:21} {state} {json.dumps(record.parameters, sort_keys=True)}")
        return 0
    if args.action == "history":
        found = [(m, r, why) for m, r, why in read_all(settings, codec) if (m.key() or b"").decode() == args.rule_id]
        if not found:
            raise ConfigError(f"no rule {args.rule_id!r} on {settings.rules_topic}")
        for message, record, why in found:
            where = f"@{message.offset()}"
            if record is None:
                print(f"{where:8} {why}")
            else:
                print(f"{where:8} v{record.version:<4} {_when(record.written_at)} {record.author}: "
                      f"{'enabled' if record.enabled else 'disabled'} {json.dumps(record.parameters, sort_keys=True)}"
                      + (f"  # {record.comment}" if record.comment else ""))
        return 0
    record = rules.get(args.rule_id)
    if record is None:
        raise ConfigError(f"no rule {args.rule_id!r} in force on {settings.rules_topic}; known: {', '.join(sorted(rules))}")
    if args.action == "show":
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str))
        return 0
    changed = dataclasses.replace(record, version=record.version + 1, enabled=args.action == "enable",
                                  author=args.author, comment=args.comment, written_at=datetime.now(UTC))
    write_records(settings, codec, [changed])
    print(f"{changed.id} v{changed.version} written ({args.action}d)")
    return 0


def latest(settings: Settings, codec: RulesCodec) -> dict[str, Rule]:
    """The version of each rule that detectors run: the newest valid one (a tombstone removes the rule)."""
    rules: dict[str, Rule] = {}
    for message, record, why in read_all(settings, codec):
        key = (message.key() or b"").decode("utf-8", "replace")
        if why == "removed":
            rules.pop(key, None)
        elif record is not None and record.id == key and (key not in rules or record.version > rules[key].version):
            rules[key] = record
    return rules


def write_rules_text(settings: Settings, text: str, where: str, *, author: str, comment: str,
                     codec: RulesCodec | None = None, only_changed: bool = False) -> list[Rule]:
    """`rules set`: every rule of a TOML text as its next version, all checked before any is written (all or
    nothing), then written. The console's rule editor calls this too, with `only_changed` (its text holds
    every rule; the ones left as they are get no new version)."""
    codec = codec or RulesCodec(settings)
    current = latest(settings, codec)
    records = records_from_toml(text, where, settings, current, author=author, comment=comment)
    if only_changed:
        records = [r for r in records if r.id not in current or not same_content(current[r.id], r)]
        if not records:
            raise ConfigError(f"{where}: no rule changed; nothing written")
    write_records(settings, codec, records)
    return records


def _read_rules_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"rules file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path}: not valid TOML: {exc}") from exc


def _records_from_file(path: Path, settings: Settings, current: dict[str, Rule], *, author: str,
                       comment: str) -> list[Rule]:
    return records_from_toml(_read_rules_file(path), f"rules file {path}", settings, current, author=author,
                             comment=comment)


def records_from_toml(text: str, where: str, settings: Settings, current: dict[str, Rule], *, author: str,
                      comment: str) -> list[Rule]:
    """The rules of a TOML text (as `rules set` reads a file; the console's editor too), each as its next
    version and checked; the first problem is a ConfigError naming `where`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    if not data:
        raise ConfigError(f"{where}: no rule in it (one [table] per rule id)")
    now = datetime.now(UTC)
    records = []
    for rule_id, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {rule_id} must be a table ([{rule_id}])")
        params = dict(table)
        kind, enabled = params.pop("kind", rule_id), params.pop("enabled", True)
        if not isinstance(kind, str) or not isinstance(enabled, bool):
            raise ConfigError(f"{where}: {rule_id}.kind must be a string and {rule_id}.enabled true or false")
        previous = current.get(rule_id)
        record = Rule(id=rule_id, version=previous.version + 1 if previous else 1, kind=kind, parameters=params,
                      enabled=enabled, author=author, comment=comment, written_at=now)
        try:
            checked = rule_thresholds(record, settings)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}; nothing written") from None
        # Written as checked: integers given for floats become floats, so readers see one type per key.
        records.append(dataclasses.replace(record, parameters={
            k: tuple(checked[k]) if isinstance(checked[k], list) else checked[k] for k in params}))
    return records


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
