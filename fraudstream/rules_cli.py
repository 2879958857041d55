"""`fraudstream rules`: read and change the detection rules on the rules topic, while detectors run.

    fraudstream rules list                 the rules in force (latest valid version of each)
    fraudstream rules show ID              one rule, as JSON
    fraudstream rules set FILE             write the rules of a TOML file (validated first; all or nothing)
    fraudstream rules enable ID | disable ID
    fraudstream rules delete ID            remove a rule (a tombstone)
    fraudstream rules history [ID]         every change still on the topic, oldest first: when, who, what
    fraudstream rules shadow set FILE      a candidate rule set beside the live one (detectors judge by both,
                                           route by the live one); `shadow clear`, `shadow list`
    fraudstream rules promote              the shadow set becomes the live one, in one change

Each command writes its change (however many records) in one Kafka transaction, so detectors apply it whole,
at one batch boundary.

A FILE has one table per rule id, as the rules file does: `[large_amount]` with `threshold_cents = 50000`.
`kind` names the predicate (default: the id, so the rules file's tables work as they are) and `enabled`
defaults to true; the other keys are the kind's parameters, checked as `detect --rules` checks them.

Who: when the Kafka client config authenticates this client (SASL, or a TLS client certificate), each
change names that principal and `--author` is refused; otherwise the author is the OS user or
`--author`, and `history` calls it self-declared. Everything a record says is printed through
fraudstream.printable (no control character reaches the terminal).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

from fraudstream.consumer.rules_topic import (
    AUTHOR_HEADER,
    CHANGE_HEADER,
    COMMENT_HEADER,
    MAX_RULES,
    MAX_TEXT_CHARS,
    PRINCIPAL_HEADER,
    REFUSED,
    SHADOW_PREFIX,
    UNCHANGED,
    Change,
    RulesCodec,
    TopicRules,
    Write,
    client_principal,
    read_rules,
    removal,
    rule_thresholds,
    rule_write,
    same_content,
    shadow_key,
    write_change,
)
from fraudstream.errors import ConfigError
from fraudstream.printable import printable
from fraudstream.records import Rule
from fraudstream.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fraudstream.cli import add_connection_arguments

    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the rules in force")
    for name, help_text in (
        ("show", "one rule, as JSON"),
        ("enable", "enable a rule (a new version)"),
        ("disable", "disable a rule (a new version)"),
        ("delete", "remove a rule (a tombstone)"),
    ):
        sub.add_parser(name, help=help_text).add_argument("rule_id", metavar="ID")
    sub.add_parser(
        "history", help="every change still on the topic (of one rule, given its ID): when, who, what"
    ).add_argument("rule_id", metavar="ID", nargs="?")
    set_parser = sub.add_parser("set", help="write the rules of a TOML file, validated first")
    set_parser.add_argument("file", type=Path, metavar="FILE")
    shadow = sub.add_parser(
        "shadow", help="the shadow rule set: judged beside the live rules by every detector, routing nothing"
    )
    shadow_sub = shadow.add_subparsers(dest="shadow_action", required=True, metavar="ACTION")
    shadow_sub.add_parser(
        "set", help="write the rules of a TOML file as the shadow set (replacing it), validated first"
    ).add_argument("file", type=Path, metavar="FILE")
    shadow_sub.add_parser("clear", help="remove every shadow rule")
    shadow_sub.add_parser("list", help="the shadow rules")
    sub.add_parser(
        "promote", help="make the shadow set the live rules (and clear it), in one change; prints what changed"
    )
    writers = [sub.choices[name] for name in ("set", "enable", "disable", "delete", "promote")]
    writers += [shadow_sub.choices["set"], shadow_sub.choices["clear"]]
    for action in writers:
        action.add_argument(
            "--author",
            help="who writes it, on a cluster that does not authenticate clients "
            "(default: the OS user); refused where it does",
        )
        action.add_argument("--comment", default="", help="why")
    for action in [*sub.choices.values(), *shadow_sub.choices.values()]:
        if action is not shadow:
            add_connection_arguments(action)


def run(args: argparse.Namespace, settings: Settings) -> int:
    codec = RulesCodec(settings)
    if args.action == "history":
        return _history(settings, codec, args.rule_id)
    topic = read_rules(settings, codec)
    if args.action == "shadow":
        return _shadow(args, settings, codec, topic)
    if args.action == "promote":
        return _promote(args, settings, codec, topic)
    rules = topic.live
    if args.action == "set":
        records = write_rules_text(
            settings,
            _read_rules_file(args.file),
            f"rules file {args.file}",
            author=_author(settings, args),
            comment=args.comment,
            codec=codec,
            current=rules,
        )
        for written in records:
            print(f"{written.id} v{written.version} written")
        return 0
    if args.action == "list":
        _list(rules)
        count = len(topic.shadow)
        print(f"shadow set: {count} rule{'s' * (count != 1)}" + (" (`fraudstream rules shadow list`)" if count else ""))
        return 0
    record = rules.get(args.rule_id)
    if record is None:
        raise ConfigError(
            f"no rule {args.rule_id!r} in force on {settings.rules_topic}; known: {', '.join(sorted(rules))}"
        )
    if args.action == "show":
        print(
            printable(
                json.dumps(record.to_dict(), indent=2, sort_keys=True, default=str, ensure_ascii=False), json=True
            )
        )
        return 0
    author = _author(settings, args)
    if args.action == "delete":
        _check_text("comment", args.comment)
        write_change(settings, [removal(record.id, author=author, comment=args.comment)])
        print(f"{record.id} deleted")
        return 0
    changed = dataclasses.replace(
        record,
        version=record.version + 1,
        enabled=args.action == "enable",
        author=author,
        comment=args.comment,
        written_at=datetime.now(UTC),
    )
    rule_thresholds(changed, settings)  # the checks a detector applies: e.g. the last version, or a long comment
    write_rules(settings, codec, [changed])
    print(f"{changed.id} v{changed.version} written ({args.action}d)")
    return 0


def latest(settings: Settings, codec: RulesCodec) -> dict[str, Rule]:
    """The version of each rule that detectors run: the topic judged by the detector's own reader."""
    return read_rules(settings, codec).live


def write_rules(settings: Settings, codec: RulesCodec, records: list[Rule]) -> None:
    """Rule versions (live) as one change: one transaction."""
    write_change(settings, [rule_write(codec, record) for record in records])


def _list(rules: dict[str, Rule]) -> None:
    for listed in sorted(rules.values(), key=lambda r: r.id):
        state = "enabled " if listed.enabled else "disabled"
        print(
            f"{listed.id:24} v{listed.version:<4} {printable(listed.kind):21} {state} "
            f"{json.dumps(listed.parameters, sort_keys=True)}"
        )


def _shadow(args: argparse.Namespace, settings: Settings, codec: RulesCodec, topic: TopicRules) -> int:
    """`rules shadow set FILE | clear | list`: the shadow set, replaced or removed in one change."""
    if args.shadow_action == "list":
        _list(topic.shadow)
        return 0
    author = _author(settings, args)
    _check_text("comment", args.comment)
    records = []
    if args.shadow_action == "set":
        records = records_from_toml(
            _read_rules_file(args.file),
            f"rules file {args.file}",
            settings,
            topic.shadow,
            author=author,
            comment=args.comment,
            replacing=True,
        )
    dropped = sorted(topic.shadow.keys() - {r.id for r in records})
    if not records and not dropped:
        print(f"no shadow rule on {settings.rules_topic}: nothing to clear")
        return 0
    # Removals first: the shadow set never holds more than the file's rules, so never more than MAX_RULES.
    _write_and_say(
        settings,
        [
            *((removal(shadow_key(i), author=author, comment=args.comment), f"shadow {i} deleted") for i in dropped),
            *((rule_write(codec, r, shadow=True), f"shadow {r.id} v{r.version} written") for r in records),
        ],
    )
    return 0


def _write_and_say(settings: Settings, writes: list[tuple[Write, str | None]]) -> None:
    """One change (one transaction), then the line of each of its records that has one."""
    write_change(settings, [write for write, _ in writes])
    for _, line in writes:
        if line is not None:
            print(line)


def _promote(args: argparse.Namespace, settings: Settings, codec: RulesCodec, topic: TopicRules) -> int:
    """`rules promote`: each shadow rule as the next live version of its id, every live rule not in the shadow
    set removed, and the shadow set cleared: one transaction, so detectors switch at one batch boundary."""
    if not topic.shadow:
        raise ConfigError(
            f"no shadow rule set on {settings.rules_topic}: nothing to promote (`fraudstream rules shadow set FILE`)"
        )
    author = _author(settings, args)
    _check_text("comment", args.comment)
    now = datetime.now(UTC)
    promoted = [
        dataclasses.replace(
            shadow,
            version=topic.live[shadow.id].version + 1 if shadow.id in topic.live else 1,
            author=author,
            comment=args.comment or f"promoted from shadow v{shadow.version}",
            written_at=now,
        )
        for shadow in sorted(topic.shadow.values(), key=lambda r: r.id)
    ]
    for record in promoted:
        rule_thresholds(record, settings)  # the checks a detector applies (e.g. a live rule at its last version)
    retired = sorted(topic.live.keys() - topic.shadow.keys())
    comment = args.comment or "promoted the shadow set, which does not have it"
    # Live removals first, so the live set never holds more than MAX_RULES on the way.
    _write_and_say(
        settings,
        [
            *((removal(i, author=author, comment=comment), f"{i} deleted (not in the shadow set)") for i in retired),
            *(
                (rule_write(codec, r), f"{r.id} v{r.version} written (shadow v{topic.shadow[r.id].version})")
                for r in promoted
            ),
            *((removal(shadow_key(r.id), author=author, comment=args.comment or "promoted"), None) for r in promoted),
        ],
    )
    print(f"shadow set cleared ({len(promoted)} rule{'s' * (len(promoted) != 1)} promoted)")
    return 0


def _author(settings: Settings, args: argparse.Namespace) -> str:
    """The authenticated principal where the cluster authenticates this client; else --author or the OS user."""
    principal = client_principal(settings)
    if principal is not None:
        if args.author is not None and args.author != principal:
            raise ConfigError(
                f"--author: this client is authenticated as {printable(principal)}, and each change "
                "names that principal; leave --author out"
            )
        return principal
    author = args.author if args.author is not None else getpass.getuser()
    _check_text("author", author)
    return author


def _check_text(name: str, text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"--{name} has {len(text)} characters; at most {MAX_TEXT_CHARS}")


def _history(settings: Settings, codec: RulesCodec, rule_id: str | None) -> int:
    changes = read_rules(settings, codec).changes
    if rule_id is not None:  # the rule's live and shadow changes
        keys = {rule_id.encode(), shadow_key(rule_id).encode()}
        changes = [c for c in changes if (c.message.key() or b"") in keys]
        if not changes:
            raise ConfigError(f"no rule {rule_id!r} on {settings.rules_topic}")
    for change in changes:
        print(history_line(change))
    return 0


def history_line(change: Change) -> str:
    """One change: where, when (whose clock), who (authenticated or self-declared), what, and its fate."""
    message, record = change.message, change.record
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in message.headers() or []}
    kind, ms = message.timestamp()
    when = f"{_when(datetime.fromtimestamp(ms / 1000, UTC))} ({'broker' if kind == TIMESTAMP_LOG_APPEND_TIME else 'writer'})"
    principal = headers.get(PRINCIPAL_HEADER)
    declared = record.author if record is not None else headers.get(AUTHOR_HEADER, "")
    who = f"{principal} (authenticated)" if principal else f"{declared or '?'} (self-declared)"
    key = (message.key() or b"").decode("utf-8", "replace")
    if change.shadow:  # its id after the prefix, and the line marked
        key = key.removeprefix(SHADOW_PREFIX)
    if message.value() is None:
        what = f"{key} deleted" + (" (no such rule)" if change.outcome == UNCHANGED else "")
        comment = headers.get(COMMENT_HEADER, "")
    elif record is None:
        what, comment = f"{key}: not a rule record", ""
    else:
        what = (
            f"{record.id} v{record.version} {record.kind} {'enabled' if record.enabled else 'disabled'} "
            f"{json.dumps(record.parameters, sort_keys=True)}"
        )
        comment = record.comment
    if change.shadow:
        what = f"[shadow] {what}"
    part = f"[change {headers[CHANGE_HEADER]}]  " if CHANGE_HEADER in headers else ""  # one of several records
    line = f"@{message.offset():<6} {when}  {part}{who}: {what}" + (f"  # {comment}" if comment else "")
    if change.outcome == REFUSED:
        line += f"  REFUSED: {change.reason}"
    elif change.outcome == UNCHANGED and record is not None:
        line += "  (a repeat: no change)"
    return printable(line)


def write_rules_text(
    settings: Settings,
    text: str,
    where: str,
    *,
    author: str,
    comment: str,
    codec: RulesCodec | None = None,
    only_changed: bool = False,
    current: dict[str, Rule] | None = None,
) -> list[Rule]:
    """`rules set`: every rule of a TOML text as its next version, all checked before any is written (all or
    nothing), then written. The console's rule editor calls this too, with `only_changed` (its text holds
    every rule; the ones left as they are get no new version)."""
    codec = codec or RulesCodec(settings)
    current = latest(settings, codec) if current is None else current
    records = records_from_toml(text, where, settings, current, author=author, comment=comment)
    if only_changed:
        records = [r for r in records if r.id not in current or not same_content(current[r.id], r)]
        if not records:
            raise ConfigError(f"{where}: no rule changed; nothing written")
    write_rules(settings, codec, records)
    return records


def _read_rules_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"rules file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rules file {path}: not valid TOML: {exc}") from exc


def _records_from_file(
    path: Path, settings: Settings, current: dict[str, Rule], *, author: str, comment: str
) -> list[Rule]:
    return records_from_toml(
        _read_rules_file(path), f"rules file {path}", settings, current, author=author, comment=comment
    )


def records_from_toml(
    text: str,
    where: str,
    settings: Settings,
    current: dict[str, Rule],
    *,
    author: str,
    comment: str,
    replacing: bool = False,
) -> list[Rule]:
    """The rules of a TOML text (as `rules set` reads a file; the console's editor too), each as its next
    version and checked; the first problem is a ConfigError naming `where`. `replacing`: the text's rules
    replace `current` (the shadow set), so they alone count towards MAX_RULES."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    if not data:
        raise ConfigError(f"{where}: no rule in it (one [table] per rule id)")
    counted = data.keys() if replacing else current.keys() | data.keys()
    if len(counted) > MAX_RULES:
        raise ConfigError(
            f"{where}: {len(counted)} rules{'' if replacing else ' with those on the topic'}; "
            f"at most {MAX_RULES}{'' if replacing else ' (`fraudstream rules delete ID` makes room)'}; nothing written"
        )
    now = datetime.now(UTC)
    records = []
    for rule_id, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {rule_id!r} must be a table")
        params = dict(table)
        kind, enabled = params.pop("kind", rule_id), params.pop("enabled", True)
        if not isinstance(kind, str) or not isinstance(enabled, bool):
            raise ConfigError(f"{where}: {rule_id!r}: kind must be a string and enabled true or false")
        previous = current.get(rule_id)
        record = Rule(
            id=rule_id,
            version=previous.version + 1 if previous else 1,
            kind=kind,
            parameters=params,
            enabled=enabled,
            author=author,
            comment=comment,
            written_at=now,
        )
        try:
            checked = rule_thresholds(record, settings)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}; nothing written") from None
        # Written as checked: integers given for floats become floats, so readers see one type per key.
        records.append(
            dataclasses.replace(
                record,
                parameters={k: tuple(checked[k]) if isinstance(checked[k], list) else checked[k] for k in params},
            )
        )
    return records


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
